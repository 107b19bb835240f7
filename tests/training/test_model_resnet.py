"""The ``resnet`` kind: its builder (``training/models/resnet.py``) and its facts (``common.models.ResnetSpec``)."""

from __future__ import annotations

import pytest
import torch

from swarmtrain.common.models import DataShape, ResnetSpec
from swarmtrain.common.shapes import ShapeError
from tests.training._kinds import check_shape_kind

IMAGE = DataShape(features=3 * 8 * 8, classes=5, image=(3, 8, 8))


@pytest.mark.parametrize(
    "spec",
    [ResnetSpec(), ResnetSpec(depth=1, width=4, stages=1), ResnetSpec(depth=3, width=8, stages=4)],
)
def test_a_resnet_builds_exactly_what_the_contract_counts(spec: ResnetSpec) -> None:
    check_shape_kind(spec, IMAGE, torch.randn(2, 3 * 8 * 8), (2, 5))


def test_input_shape_gives_the_image_of_a_flat_table() -> None:
    spec = ResnetSpec(depth=1, width=4, input_shape=[1, 8, 8])
    check_shape_kind(spec, DataShape(features=64, classes=10), torch.randn(3, 64), (3, 10))


def test_parameter_count_by_hand() -> None:
    # stem 1->4; stage 1: block 4->4 (no projection); stage 2: block 4->8 stride 2 (projection)
    spec = ResnetSpec(depth=1, width=4, stages=2, input_shape=[1, 8, 8])
    stem = 9 * 1 * 4 + 2 * 4
    b1 = 9 * 4 * 4 + 9 * 4 * 4 + 4 * 4
    b2 = 9 * 4 * 8 + 9 * 8 * 8 + 4 * 8 + (4 * 8 + 2 * 8)
    assert spec.parameter_count(DataShape(64, 3)) == stem + b1 + b2 + 8 * 3 + 3


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        (DataShape(features=10, classes=2), "a resnet needs image data"),
        (DataShape(features=8, classes=2, vocab=100), "takes rows of values, not text"),
        (DataShape(features=10, classes=2, image=(1, 2, 2)), "holds 4 values but the data has 10"),
    ],
)
def test_a_resnet_that_cannot_be_built_says_why(shape: DataShape, reason: str) -> None:
    with pytest.raises(ShapeError, match=reason):
        ResnetSpec().check(shape)
