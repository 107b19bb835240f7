"""Training data as tensors: a dataset read by its format's reader (``formats``), the seeded
train/validation split, and a shard's rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from swarmtrain.common import shapes
from swarmtrain.common.events import DataSpec
from swarmtrain.training.formats import FORMATS, DataError

__all__ = ["DataError", "Dataset", "load", "shard_indices", "split_indices"]


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
    image: tuple[int, int, int] | None = None
    """An images dataset's [C, H, W] (its features are those pixels, flat); None for other formats."""

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
        image=(spec.channels, spec.image_size[0], spec.image_size[1])
        if spec.format == "images" and spec.image_size and len(spec.image_size) == 2
        else None,
    )


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
