"""Training data as tensors: a dataset read by its format's reader (``formats``), the seeded
train/validation split, and a shard's rows.

:func:`load` reads a dataset whole. :func:`read_index` reads what sharding needs without the
features (labels, classes, feature names), and :func:`read_rows` / :func:`scan` read only the
rows asked for, with memory bounded by those rows: exactly ``load(...).features[rows]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swarmtrain.common import shapes
from swarmtrain.common.events import DataSpec
from swarmtrain.training.formats import FORMATS, Blocks, DataError, Index

__all__ = [
    "DataError",
    "Dataset",
    "Index",
    "load",
    "read_index",
    "read_rows",
    "scan",
    "shard_indices",
    "split_indices",
    "with_validation",
]


@dataclass(frozen=True, kw_only=True)
class Dataset:
    features: torch.Tensor
    """float32, shape (rows, features)."""
    labels: torch.Tensor
    """int64, shape (rows,): indexes into ``classes``."""
    classes: list[str]
    """Sorted unique label strings; a label's index is its class number."""
    feature_names: list[str]
    label_column: str
    target: str = "classification"
    """The task its label is for (``events.Task``); a regression's ``labels`` are float32 targets."""
    image: tuple[int, int, int] | None = None
    """An images dataset's [C, H, W] (its features are those pixels, flat); None for other formats."""
    vocab: int = 0
    """A text corpus's vocabulary: a row is a window of token ids (float32, exact), its label the
    next token at each position (int64, ``(rows, context)``); 0 for other formats."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load(path: Path, spec: DataSpec, label_column: str) -> Dataset:
    """Read ``path``, a dataset in ``spec.format``, into tensors with that format's reader
    (``formats.FORMATS``); a DataError says what is wrong with it."""
    table = FORMATS.get(spec.format).load(path, spec, label_column)
    return Dataset(
        features=torch.from_numpy(table.features),
        labels=torch.from_numpy(table.labels),
        classes=table.classes,
        feature_names=table.feature_names,
        label_column=table.label_column,
        target=table.target,
        image=(spec.channels, spec.image_size[0], spec.image_size[1])
        if spec.format == "images" and spec.image_size and len(spec.image_size) == 2
        else None,
        vocab=table.vocab,
    )


def read_index(path: Path, spec: DataSpec, label_column: str) -> Index:
    """``load``'s labels, classes and feature names, without the features."""
    return FORMATS.get(spec.format).index(path, spec, label_column)


def scan(path: Path, spec: DataSpec, label_column: str, rows: np.ndarray) -> Blocks:
    """The features of ``rows`` (sorted, unique) in ascending blocks ``(row indexes, float32)``."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > 1 and not bool((np.diff(rows) > 0).all()):
        raise ValueError("scan needs sorted, unique row indexes")
    return FORMATS.get(spec.format).scan(path, spec, label_column, rows)


def read_rows(path: Path, spec: DataSpec, label_column: str, rows: torch.Tensor, n_features: int) -> torch.Tensor:
    """The features of ``rows`` (distinct row indexes, in any order), in that order: exactly
    ``load(path, spec, label_column).features[rows]``, reading no more than the format must."""
    order = rows.numpy().astype(np.int64)
    at = np.argsort(order, kind="stable")
    ascending = order[at]
    if len(ascending) > 1 and not bool((np.diff(ascending) > 0).all()):
        raise ValueError("read_rows needs distinct row indexes")
    out = np.empty((len(order), n_features), dtype=np.float32)
    done = 0
    for got, block in scan(path, spec, label_column, ascending):
        if not np.array_equal(got, ascending[done : done + len(got)]):
            raise DataError("the format's reader returned rows out of order")
        out[at[done : done + len(got)]] = block
        done += len(got)
    if done != len(order):
        raise DataError(f"the dataset has fewer rows than asked for: {done} of {len(order)} read")
    return torch.from_numpy(out)


def with_validation(train: Dataset, validation: Dataset) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """A session with its own validation set: one dataset of every training row then every
    validation row, and the (train, validation) indexes into it (all of ``train``'s rows train).
    A DataError unless the two have the same feature columns, classes and target."""
    if train.feature_names != validation.feature_names:
        raise DataError("the validation dataset's feature columns differ from the training dataset's")
    if train.target != validation.target or train.classes != validation.classes:
        raise DataError("the validation dataset's target or classes differ from the training dataset's")
    both = Dataset(
        features=torch.cat([train.features, validation.features]),
        labels=torch.cat([train.labels, validation.labels]),
        classes=train.classes,
        feature_names=train.feature_names,
        label_column=train.label_column,
        target=train.target,
        image=train.image,
        vocab=train.vocab,
    )
    n, m = len(train), len(validation)
    return both, torch.arange(n), torch.arange(n, n + m)


def split_indices(n: int, validation_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, validation) row indexes for ``n`` rows.

    A seeded permutation; validation is its first ``shapes.validation_rows(n, validation_split)`` rows.
    """
    try:
        n_val = shapes.validation_rows(n, validation_split)
    except shapes.ShapeError as exc:
        raise DataError(str(exc)) from None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def shard_indices(train_idx: torch.Tensor, num_shards: int, shard: int, seed: int) -> torch.Tensor:
    """Shard ``shard`` of ``num_shards`` of the training rows ``train_idx``.

    A seeded permutation of ``train_idx`` cut at ``shapes.shard_bounds``: disjoint, together all of
    ``train_idx``, and the same on every machine for the same seed.
    """
    try:
        start, stop = shapes.shard_bounds(len(train_idx), num_shards, shard)
    except shapes.ShapeError as exc:
        raise DataError(str(exc)) from None
    perm = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
    return train_idx[perm][start:stop]
