"""The ``cnn`` kind: its builder (``training/models/cnn.py``) and its facts (``common.models.CnnSpec``)."""

from __future__ import annotations

import pytest

from swarmtrain.common.models import CnnSpec, DataShape, from_fields
from swarmtrain.common.shapes import ShapeError
from swarmtrain.training.models import MODELS
from tests.training._models import check_kind

# sha256 of the seeded files 5cd7306 wrote (before the kinds were modules)
SMALL = CnnSpec(input_shape=[1, 8, 8], channels=[4], hidden=[8])
WIDE = CnnSpec(input_shape=[3, 5, 4], channels=[6, 2], hidden=[])
PINNED = [
    (SMALL, 64, 10, "d49d96818d2eb38f34c55f62ecd9e74e51864b92091c4734bfdb3da1d065132c"),
    (WIDE, 60, 4, "98e79dc6d18df16eb3a57bdc6c1a6853908c1a68cae1332e6306b3a72ae53d6d"),
]


@pytest.mark.parametrize(("spec", "features", "classes", "sha256"), PINNED)
def test_a_cnn_builds_counts_and_writes_the_bytes_it_always_did(
    spec: CnnSpec, features: int, classes: int, sha256: str
) -> None:
    check_kind(spec, features, classes, sha256)


def test_a_cnn_is_registered() -> None:
    assert "cnn" in MODELS.list()


def test_parameter_count_by_hand() -> None:
    # 8x8 -> 4x4 -> 2x2 -> 1x1 -> 1x1 (no pool once below 2x2)
    spec = CnnSpec(hidden=[32], input_shape=[1, 8, 8], channels=[4, 8, 16, 16])
    conv = (9 * 1 * 4 + 4) + (9 * 4 * 8 + 8) + (9 * 8 * 16 + 16) + (9 * 16 * 16 + 16)
    assert spec.parameter_count(DataShape(64, 10)) == conv + (16 * 32 + 32) + (32 * 10 + 10)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (CnnSpec(input_shape=[1, 1, 3]), "input_shape 1x1x3 holds 3 values but the data has 2 feature columns"),
        (CnnSpec(input_shape=None), "a cnn needs input_shape"),
        (CnnSpec(input_shape=[1, 1, 2], channels=[]), "at least one positive channel width"),
    ],
)
def test_a_cnn_that_does_not_fit_the_data_is_refused_with_the_reason(spec: CnnSpec, reason: str) -> None:
    with pytest.raises(ShapeError, match=reason):
        spec.check(DataShape(2, 2))


def test_a_request_for_a_cnn_needs_its_input_shape_and_gets_the_default_channels() -> None:
    with pytest.raises(ShapeError, match=r"a cnn needs model\.input_shape"):
        from_fields("cnn", {"hidden": [4]})
    assert from_fields("cnn", {"input_shape": [1, 2, 2]}) == CnnSpec(input_shape=[1, 2, 2], channels=[16, 32])
    with pytest.raises(ShapeError, match=r"model\.channels applies to a cnn only, not to a mlp"):
        from_fields("mlp", {"channels": [4]})
