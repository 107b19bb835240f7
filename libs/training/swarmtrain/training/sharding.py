"""How a fedavg session's training rows are cut into shards: pure functions of (rows, labels, seed).

``iid`` is today's split (:func:`data.shard_indices`: a seeded permutation cut into near-equal
chunks). ``label_skew`` is the usual non-IID benchmark: for each class, its rows are shuffled and
dealt to the shards in proportions drawn from Dirichlet(``alpha``); a small alpha gives each shard
few classes, a large one approaches IID. Draws come from ``numpy.random.Generator(PCG64(seed))``,
so every peer computes the same shards. Each result carries the shards' label histograms, for the
session's facts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from swarmtrain.common.fedopts import ShardingSpec
from swarmtrain.training.data import DataError, shard_indices

MAX_DRAWS = 1000
"""label_skew draws again (from the same generator) while a shard would be empty; at most this often."""

__all__ = ["SHARDERS", "Sharding", "ShardingSpec", "histograms", "iid", "label_skew", "make_shards"]


@dataclass(frozen=True)
class Sharding:
    shards: list[torch.Tensor]
    """Per shard, int64 row indexes into the dataset (a subset of the training rows)."""
    histograms: list[list[int]]
    """Per shard, its row count for each class index."""


def histograms(labels: torch.Tensor, shards: list[torch.Tensor], num_classes: int) -> list[list[int]]:
    """Per shard, how many of its rows carry each class index ``0 .. num_classes - 1``; for a
    regression's targets (floats, no classes), one count per shard: its rows."""
    if labels.is_floating_point():
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
    if labels.is_floating_point() and spec.name != "iid":
        raise DataError(f"sharding {spec.name!r} skews classes: a regression target has none (use iid)")
    return SHARDERS[spec.name](spec, train_idx, labels, num_shards, seed)


def _classes(labels: torch.Tensor) -> int:
    if labels.is_floating_point():
        return 0
    return int(labels.max()) + 1 if labels.numel() else 0
