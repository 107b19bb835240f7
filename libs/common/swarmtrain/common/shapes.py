"""The shapes gateway and peer both compute, stated once: pure arithmetic, no torch.

(A model kind's layers and parameter count are its own facts: ``common.models``.)

- the validation split's size (the gateway checks what is left to train, the peer cuts it);
- the fedavg shards' sizes (the gateway refuses empty shards, the peer cuts them).

A shape that cannot exist raises ``ShapeError`` (a ``ValueError``) with a message fit for a person.
"""

from __future__ import annotations

import math


class ShapeError(ValueError):
    """A model, split or shard that cannot exist; the message says why."""


def validation_rows(rows: int, validation_split: float) -> int:
    """How many of ``rows`` the split holds out: ``round(rows * validation_split)``, at least one when the
    split is positive and there are two rows or more, and never all of them."""
    if not (math.isfinite(validation_split) and 0.0 <= validation_split < 1.0):
        raise ShapeError(f"validation_split must be in [0, 1), got {validation_split}")
    n_val = round(rows * validation_split)
    if validation_split > 0 and rows >= 2:
        n_val = max(1, n_val)
    return min(n_val, max(rows - 1, 0))


def training_rows(rows: int, validation_split: float) -> int:
    """The rows left to train on after the validation split."""
    return rows - validation_rows(rows, validation_split)


def shard_sizes(rows: int, num_shards: int) -> list[int]:
    """Sizes of ``num_shards`` contiguous shards of ``rows`` training rows: differing by at most one, the
    first ones the larger (as ``torch.tensor_split`` cuts). Refuses a shard that would be empty."""
    if num_shards < 1:
        raise ShapeError(f"{num_shards} shards do not exist")
    if num_shards > rows:
        raise ShapeError(f"{num_shards} shards of {rows} training rows would leave a shard empty")
    size, larger = divmod(rows, num_shards)
    return [size + 1 if i < larger else size for i in range(num_shards)]


def shard_bounds(rows: int, num_shards: int, shard: int) -> tuple[int, int]:
    """``[start, stop)`` of shard ``shard`` in a list of ``rows`` training rows."""
    if not 0 <= shard < num_shards:
        raise ShapeError(f"shard {shard} of {num_shards} does not exist")
    sizes = shard_sizes(rows, num_shards)
    start = sum(sizes[:shard])
    return start, start + sizes[shard]
