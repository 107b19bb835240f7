"""How a fedavg session's training rows are cut into shards: pure functions of (rows, labels, seed).

``iid`` is today's split (:func:`data.shard_indices`: a seeded permutation cut into near-equal
chunks). ``label_skew`` is the usual non-IID benchmark: for each class, its rows are shuffled and
dealt to the shards in proportions drawn from Dirichlet(``alpha``); a small alpha gives each shard
few classes, a large one approaches IID. Draws come from ``numpy.random.Generator(PCG64(seed))``,
so every peer computes the same shards. Each result carries the shards' label histograms, for the
session's facts.

:func:`read_shard` is a fedavg peer's read (``DataRead`` ``shard``): the labels first
(``data.read_index``), then the shards from them, then one streamed pass over the features that
keeps only this shard's rows and the validation rows and fits the streamed ``Standardize`` rule
(``training.stats``) on the training rows as they pass: memory grows with the shard, not the
dataset, and the rows are exactly those a whole read would slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swarmtrain.common import shapes
from swarmtrain.common.events import DataSpec
from swarmtrain.common.fedopts import ShardingSpec
from swarmtrain.training.data import DataError, read_index, scan, shard_indices, split_indices
from swarmtrain.training.formats.text import read_windows
from swarmtrain.training.stats import StreamedStats

MAX_DRAWS = 1000
"""label_skew draws again (from the same generator) while a shard would be empty; at most this often."""

__all__ = [
    "SHARDERS",
    "ShardData",
    "Sharding",
    "ShardingSpec",
    "histograms",
    "iid",
    "label_skew",
    "make_shards",
    "read_shard",
]


@dataclass(frozen=True)
class Sharding:
    shards: list[torch.Tensor]
    """Per shard, int64 row indexes into the dataset (a subset of the training rows)."""
    histograms: list[list[int]]
    """Per shard, its row count for each class index."""


def histograms(labels: torch.Tensor, shards: list[torch.Tensor], num_classes: int) -> list[list[int]]:
    """Per shard, how many of its rows carry each class index ``0 .. num_classes - 1``; for a
    regression's targets (floats, no classes), one count per shard: its rows."""
    if labels.is_floating_point() or labels.dim() > 1:  # a regression's targets, a corpus's next tokens
        return [[len(s)] for s in shards]
    return [torch.bincount(labels[s], minlength=num_classes).tolist() for s in shards]


def iid(train_idx: torch.Tensor, labels: torch.Tensor, num_shards: int, seed: int) -> Sharding:
    """Today's split, shard by shard from :func:`data.shard_indices`."""
    shards = [shard_indices(train_idx, num_shards, k, seed) for k in range(num_shards)]
    return Sharding(shards, histograms(labels, shards, _classes(labels)))


def label_skew(train_idx: torch.Tensor, labels: torch.Tensor, num_shards: int, seed: int, alpha: float) -> Sharding:
    """Per class (by class index), Dirichlet(``alpha``) proportions over the shards; the class's
    rows, in a seeded order, cut at the rounded cumulative proportions. Redrawn while a shard would
    be empty; a DataError after :data:`MAX_DRAWS` tries or with fewer rows than shards."""
    if not (alpha > 0 and np.isfinite(alpha)):
        raise DataError(f"label_skew needs alpha > 0, got {alpha}")
    if num_shards < 1:
        raise DataError(f"{num_shards} shards do not exist")
    if num_shards > len(train_idx):
        raise DataError(f"{num_shards} shards of {len(train_idx)} training rows would leave a shard empty")
    rows = np.sort(train_idx.numpy().astype(np.int64))
    row_labels = labels[torch.from_numpy(rows)].numpy()
    num_classes = _classes(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    for _ in range(MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        for c in range(num_classes):
            members = rng.permutation(rows[row_labels == c])
            share = rng.dirichlet(np.full(num_shards, alpha, dtype=np.float64))
            cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(np.int64)
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].append(piece)
        shards = [torch.from_numpy(np.sort(np.concatenate(p))) for p in parts]
        if all(len(s) for s in shards):
            return Sharding(shards, histograms(labels, shards, num_classes))
    raise DataError(f"label_skew with alpha={alpha} left a shard empty in {MAX_DRAWS} draws; raise alpha")


Sharder = Callable[[ShardingSpec, torch.Tensor, torch.Tensor, int, int], Sharding]

SHARDERS: dict[str, Sharder] = {
    "iid": lambda spec, train_idx, labels, n, seed: iid(train_idx, labels, n, seed),
    "label_skew": lambda spec, train_idx, labels, n, seed: label_skew(train_idx, labels, n, seed, spec.alpha),
}


def make_shards(
    spec: ShardingSpec, train_idx: torch.Tensor, labels: torch.Tensor, num_shards: int, seed: int
) -> Sharding:
    """The shards ``spec`` names. ``labels`` are the whole dataset's class indexes (a regression's
    targets: only ``iid`` cuts them; a label skew needs classes)."""
    if (labels.is_floating_point() or labels.dim() > 1) and spec.name != "iid":
        raise DataError(f"sharding {spec.name!r} skews classes: a regression target or a corpus has none (use iid)")
    return SHARDERS[spec.name](spec, train_idx, labels, num_shards, seed)


def _classes(labels: torch.Tensor) -> int:
    if labels.is_floating_point() or labels.dim() > 1:
        return 0
    return int(labels.max()) + 1 if labels.numel() else 0


@dataclass(frozen=True, kw_only=True)
class ShardData:
    """What a fedavg peer trains and measures on, read with :func:`read_shard`."""

    x: torch.Tensor
    """float32: the shard's rows, in the shard's order (``make_shards``)."""
    y: torch.Tensor
    x_val: torch.Tensor
    """float32: the validation rows, in ``split_indices``' order."""
    y_val: torch.Tensor
    rows: torch.Tensor
    """The shard's row indexes."""
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    train_labels: torch.Tensor
    """The training rows' class indexes, in ``train_idx``'s order."""
    histograms: list[list[int]]
    mean: torch.Tensor
    """The ``Standardize`` statistics of the whole training split (the streamed rule)."""
    std: torch.Tensor
    classes: list[str]
    feature_names: list[str]
    label_column: str

    @property
    def nbytes(self) -> int:
        held = (self.x, self.y, self.x_val, self.y_val, self.rows, self.train_idx, self.val_idx, self.train_labels)
        return sum(int(t.element_size() * t.numel()) for t in held)


def read_shard(
    path: Path,
    spec: DataSpec,
    label_column: str,
    *,
    validation_split: float,
    seed: int,
    sharding: ShardingSpec,
    num_shards: int,
    shard: int,
) -> ShardData:
    """Shard ``shard`` of ``num_shards`` of ``path``'s training rows, its validation rows and the
    training split's statistics, in one pass that holds no more than those rows and a block; a
    corpus: :func:`read_window_shard`."""
    if spec.format == "text":
        return read_window_shard(
            path,
            spec,
            validation_split=validation_split,
            seed=seed,
            sharding=sharding,
            num_shards=num_shards,
            shard=shard,
        )
    index = read_index(path, spec, label_column)
    labels = torch.from_numpy(index.labels)
    train_idx, val_idx = split_indices(index.rows, validation_split, seed)
    cut = make_shards(sharding, train_idx, labels, num_shards, seed)
    if not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} of {num_shards} does not exist")
    mine = cut.shards[shard]
    width = len(index.feature_names)
    x = np.empty((len(mine), width), dtype=np.float32)
    x_val = np.empty((len(val_idx), width), dtype=np.float32)
    at_shard = np.full(index.rows, -1, dtype=np.int64)
    at_shard[mine.numpy()] = np.arange(len(mine))
    at_val = np.full(index.rows, -1, dtype=np.int64)
    at_val[val_idx.numpy()] = np.arange(len(val_idx))
    training = np.zeros(index.rows, dtype=bool)
    training[train_idx.numpy()] = True
    stats = StreamedStats(width)
    seen = 0
    for rows, block in scan(path, spec, label_column, np.arange(index.rows)):
        stats.add(block[training[rows]])
        for where, into in ((at_shard[rows], x), (at_val[rows], x_val)):
            kept = where >= 0
            into[where[kept]] = block[kept]
        seen += len(rows)
    if seen != index.rows:
        raise DataError(f"the dataset has {index.rows} labels but {seen} rows of features")
    mean, std = stats.result()
    return ShardData(
        x=torch.from_numpy(x),
        y=labels[mine],
        x_val=torch.from_numpy(x_val),
        y_val=labels[val_idx],
        rows=mine,
        train_idx=train_idx,
        val_idx=val_idx,
        train_labels=labels[train_idx],
        histograms=cut.histograms,
        mean=mean,
        std=std,
        classes=index.classes,
        feature_names=index.feature_names,
        label_column=label_column,
    )


def read_window_shard(
    path: Path,
    spec: DataSpec,
    *,
    validation_split: float,
    seed: int,
    sharding: ShardingSpec,
    num_shards: int,
    shard: int,
) -> ShardData:
    """A corpus's shard: its windows (rows) and the validation windows, cut as a whole read cuts
    them (``split_indices``, ``iid``), read in one streamed pass that keeps only those windows
    (``formats.text.read_windows``). No statistics (token ids are not standardized), and no
    training labels kept (``train_labels`` empty: the final figures are measured window block by
    window block, :func:`window_blocks`)."""
    if sharding.name != "iid":
        raise DataError(f"sharding {sharding.name!r} skews classes: a corpus has none (use iid)")
    if not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} of {num_shards} does not exist")
    windows = read_index(path, spec, "text").rows
    train_idx, val_idx = split_indices(windows, validation_split, seed)
    mine = shard_indices(train_idx, num_shards, shard, seed)
    wanted = np.union1d(mine.numpy(), val_idx.numpy())
    x, y = read_windows(path, spec, wanted)
    at_mine, at_val = np.searchsorted(wanted, mine.numpy()), np.searchsorted(wanted, val_idx.numpy())
    sizes = [[n] for n in _shard_sizes(len(train_idx), num_shards)]
    return ShardData(
        x=torch.from_numpy(x[at_mine]),
        y=torch.from_numpy(y[at_mine]),
        x_val=torch.from_numpy(x[at_val]),
        y_val=torch.from_numpy(y[at_val]),
        rows=mine,
        train_idx=train_idx,
        val_idx=val_idx,
        train_labels=torch.empty(0, dtype=torch.int64),
        histograms=sizes,
        mean=torch.zeros(0),
        std=torch.ones(0),
        classes=[],
        feature_names=[],
        label_column="text",
    )


def _shard_sizes(rows: int, num_shards: int) -> list[int]:
    return [stop - start for start, stop in (shapes.shard_bounds(rows, num_shards, k) for k in range(num_shards))]


def window_blocks(
    path: Path, spec: DataSpec, rows: torch.Tensor, block: int = 4096
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The windows ``rows`` (any order) of a corpus as ``(x, y)`` blocks of at most ``block``
    windows, ascending: each block one streamed pass, memory bounded by a block."""
    ordered = np.sort(rows.numpy().astype(np.int64))
    for start in range(0, len(ordered), block):
        x, y = read_windows(path, spec, ordered[start : start + block])
        yield torch.from_numpy(x), torch.from_numpy(y)
