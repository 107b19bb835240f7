"""The shapes gateway and peer share, checked against what the peer actually builds and cuts."""

from __future__ import annotations

import pytest
import torch

from swarmtrain.common.events import ModelSpec
from swarmtrain.common.models import CnnSpec, MlpSpec, parameter_count
from swarmtrain.common.shapes import (
    ShapeError,
    shard_bounds,
    shard_sizes,
    training_rows,
    validation_rows,
)
from swarmtrain.training.data import shard_indices, split_indices
from swarmtrain.training.model import build_model

SPECS: list[tuple[ModelSpec, int, int]] = [
    (MlpSpec(hidden=[128, 64]), 64, 10),
    (MlpSpec(hidden=[]), 5, 3),
    (MlpSpec(hidden=[7, 1, 9]), 2, 2),
    (CnnSpec(hidden=[32], input_shape=[1, 8, 8], channels=[4, 8, 16, 16]), 64, 10),
    (CnnSpec(hidden=[], input_shape=[3, 5, 4], channels=[6]), 60, 4),
    (CnnSpec(hidden=[8], input_shape=[2, 1, 1], channels=[16, 32]), 2, 2),
    (CnnSpec(hidden=[8, 8], input_shape=[1, 3, 9], channels=[2, 3]), 27, 5),
]


@pytest.mark.parametrize(("spec", "features", "classes"), SPECS)
def test_parameter_count_is_what_the_peer_builds(spec: ModelSpec, features: int, classes: int) -> None:
    model = build_model(spec, features, classes)
    assert parameter_count(spec, features, classes) == sum(p.numel() for p in model.parameters())


def test_parameter_count_by_hand() -> None:
    assert parameter_count(MlpSpec(hidden=[128, 64]), 64, 10) == (64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10)
    # 8x8 -> 4x4 -> 2x2 -> 1x1 -> 1x1 (no pool once below 2x2)
    spec = CnnSpec(hidden=[32], input_shape=[1, 8, 8], channels=[4, 8, 16, 16])
    conv = (9 * 1 * 4 + 4) + (9 * 4 * 8 + 8) + (9 * 8 * 16 + 16) + (9 * 16 * 16 + 16)
    assert parameter_count(spec, 64, 10) == conv + (16 * 32 + 32) + (32 * 10 + 10)


def test_a_cnn_input_that_does_not_fit_the_data_is_refused() -> None:
    with pytest.raises(ShapeError, match="input_shape 1x1x3 holds 3 values but the data has 2 feature columns"):
        parameter_count(CnnSpec(input_shape=[1, 1, 3]), 2, 2)


@pytest.mark.parametrize(
    ("rows", "fraction"), [(100, 0.2), (12, 0.2), (10, 0.01), (2, 0.9), (2, 0.5), (1, 0.5), (10, 0.0), (9, 0.5)]
)
def test_split_sizes_are_the_peers(rows: int, fraction: float) -> None:
    train_idx, val_idx = split_indices(rows, fraction, seed=1)
    assert (len(val_idx), len(train_idx)) == (validation_rows(rows, fraction), training_rows(rows, fraction))


def test_split_sizes_by_hand() -> None:
    assert training_rows(12, 0.2) == 10
    assert training_rows(10, 0.01) == 9  # at least one validation row
    assert training_rows(2, 0.9) == 1  # never all of them
    with pytest.raises(ShapeError, match="validation_split"):
        validation_rows(10, 1.0)


@pytest.mark.parametrize(("rows", "shards"), [(1437, 4), (10, 3), (7, 7), (5, 1)])
def test_shard_sizes_are_the_peers(rows: int, shards: int) -> None:
    sizes = shard_sizes(rows, shards)
    assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    train_idx = torch.arange(rows)
    assert [len(shard_indices(train_idx, shards, s, seed=0)) for s in range(shards)] == sizes
    assert [shard_bounds(rows, shards, s) for s in range(shards)] == [
        (sum(sizes[:s]), sum(sizes[: s + 1])) for s in range(shards)
    ]


@pytest.mark.parametrize(
    ("rows", "shards", "shard", "message"),
    [(10, 11, 0, "11 shards of 10 training rows would leave a shard empty"), (10, 0, 0, "shard 0 of 0 does not exist")],
)
def test_impossible_shards(rows: int, shards: int, shard: int, message: str) -> None:
    with pytest.raises(ShapeError, match=message):
        shard_bounds(rows, shards, shard)
