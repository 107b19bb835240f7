"""Training data: a CSV with a header row, one label column, every other column a numeric feature."""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swarmtrain.common import shapes


class DataError(ValueError):
    """The data cannot be trained on; the message says why, in words fit for a person."""


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

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_csv(path: Path, label_column: str = "label") -> Dataset:
    """Read ``path`` into tensors. Blank lines are skipped; anything else malformed is a DataError.

    A plain numeric file takes numpy's C parser; anything it refuses (quotes, a ragged row, a bad
    cell) is read again by the careful path below, which says exactly what is wrong.
    """
    fast = _load_plain(path, label_column)
    if fast is not None:
        return fast
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError("the file is empty")
        header = [name.strip() for name in header]
        if label_column not in header:
            raise DataError(f"no label column {label_column!r} (columns: {', '.join(header[:20])})")
        label_at = header.index(label_column)
        keep = [i for i in range(len(header)) if i != label_at]
        if not keep:
            raise DataError("no feature columns besides the label")
        labels: list[str] = []
        rows: list[list[str]] = []
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"line {line}: {len(row)} fields, the header has {len(header)}")
            labels.append(row[label_at].strip())
            rows.append([row[i] for i in keep])
    if not rows:
        raise DataError("no data rows")
    feature_names = [header[i] for i in keep]
    try:
        x = np.asarray(rows, dtype=np.float32)
    except ValueError:
        raise DataError(_first_bad_cell(rows, feature_names)) from None
    if not np.isfinite(x).all():
        col = int(np.argwhere(~np.isfinite(x))[0][1])
        raise DataError(f"column {feature_names[col]!r} has a value that is not a finite number")
    classes = sorted(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    y = torch.tensor([index[label] for label in labels], dtype=torch.int64)
    return Dataset(
        features=torch.from_numpy(x),
        labels=y,
        classes=classes,
        feature_names=feature_names,
        label_column=label_column,
    )


def _load_plain(path: Path, label_column: str) -> Dataset | None:
    with path.open(encoding="utf-8-sig") as f:
        header = [name.strip() for name in f.readline().rstrip("\r\n").split(",")]
    if label_column not in header or len(header) < 2 or any('"' in name for name in header):
        return None
    label_at = header.index(label_column)
    keep = [i for i in range(len(header)) if i != label_at]
    read = {"delimiter": ",", "skiprows": 1, "encoding": "utf-8-sig", "comments": None}
    try:
        with warnings.catch_warnings():  # numpy notes blank lines and empty files: both are handled here
            warnings.simplefilter("ignore", UserWarning)
            # every column must parse, and no row may be ragged: numpy checks each line's width
            x = np.loadtxt(path, usecols=keep, dtype=np.float32, ndmin=2, **read)  # type: ignore[call-overload]
            labels = np.loadtxt(path, usecols=[label_at], dtype=str, ndmin=1, **read)  # type: ignore[call-overload]
    except ValueError:
        return None
    if x.shape[0] == 0 or x.shape[0] != labels.shape[0] or not np.isfinite(x).all():
        return None
    labels = np.char.strip(labels)
    classes, y = np.unique(labels, return_inverse=True)
    return Dataset(
        features=torch.from_numpy(np.ascontiguousarray(x)),
        labels=torch.from_numpy(y.astype(np.int64).reshape(-1)),
        classes=[str(c) for c in classes],
        feature_names=[header[i] for i in keep],
        label_column=label_column,
    )


def _first_bad_cell(rows: list[list[str]], names: list[str]) -> str:
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            try:
                float(cell)
            except ValueError:
                return f"column {names[c]!r} is not numeric (data row {r + 1}: {cell[:40]!r})"
    return "a feature value is not numeric"


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
