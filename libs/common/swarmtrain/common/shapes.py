"""The shapes gateway and peer both compute, stated once: pure arithmetic, no torch.

- the layers a ``ModelSpec`` makes and their parameter count (the gateway caps it, the peer builds
  the layers from ``conv_layers``);
- the validation split's size (the gateway checks what is left to train, the peer cuts it);
- the fedavg shards' sizes (the gateway refuses empty shards, the peer cuts them).

A shape that cannot exist raises ``ShapeError`` (a ``ValueError``) with a message fit for a person.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from swarmtrain.common.events import ModelSpec

KERNEL = 3
"""A cnn's convolutions are KERNELxKERNEL with padding KERNEL // 2, so they keep height and width."""
POOL = 2
"""After each convolution, a POOLxPOOL max-pool while the image is at least POOLxPOOL."""


class ShapeError(ValueError):
    """A model, split or shard that cannot exist; the message says why."""


@dataclass(frozen=True, slots=True)
class ConvLayer:
    in_channels: int
    out_channels: int
    pool: bool
    """Whether a max-pool follows (the image entering it is at least POOLxPOOL)."""


def cnn_input(spec: ModelSpec, features: int) -> tuple[int, int, int]:
    """The cnn's ``[C, H, W]``, checked against the data's ``features`` columns."""
    shape = spec.input_shape
    if shape is None or len(shape) != 3 or any(d < 1 for d in shape):
        raise ShapeError(f"a cnn needs input_shape [C, H, W] of positive sizes, got {shape}")
    c, h, w = shape
    if c * h * w != features:
        raise ShapeError(
            f"input_shape {c}x{h}x{w} holds {c * h * w} values but the data has {features} feature columns"
        )
    if not spec.channels or any(out < 1 for out in spec.channels):
        raise ShapeError(f"a cnn needs at least one positive channel width, got {spec.channels}")
    return c, h, w


def conv_layers(spec: ModelSpec, features: int) -> tuple[list[ConvLayer], int]:
    """A cnn's convolutions, and the width of what they flatten to (``([], features)`` for an mlp)."""
    if spec.kind != "cnn":
        return [], features
    c, h, w = cnn_input(spec, features)
    layers = []
    for out in spec.channels:
        pool = h >= POOL and w >= POOL
        layers.append(ConvLayer(in_channels=c, out_channels=out, pool=pool))
        if pool:
            h, w = h // POOL, w // POOL
        c = out
    return layers, c * h * w


def linear_widths(spec: ModelSpec, flat: int, classes: int) -> list[tuple[int, int]]:
    """The fully connected layers' ``(in, out)``: ``flat`` inputs, ``spec.hidden``, then ``classes`` logits."""
    sizes = [flat, *spec.hidden, classes]
    return list(itertools.pairwise(sizes))


def parameter_count(spec: ModelSpec, features: int, classes: int) -> int:
    """Trainable parameters of the model the peers build for ``spec`` on ``features`` inputs and
    ``classes`` outputs: weights and biases of every convolution and linear layer."""
    convs, flat = conv_layers(spec, features)
    total = sum(KERNEL * KERNEL * conv.in_channels * conv.out_channels + conv.out_channels for conv in convs)
    return total + sum(n_in * n_out + n_out for n_in, n_out in linear_widths(spec, flat, classes))


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
