"""The ``mlp`` kind: its builder (``training/models/mlp.py``) and its facts (``common.models.MlpSpec``)."""

from __future__ import annotations

import pytest

from swarmtrain.common.models import DataShape, MlpSpec
from swarmtrain.common.shapes import ShapeError
from swarmtrain.training.model import build_model, load_model
from swarmtrain.training.models import MODELS
from tests.training._models import check_kind, seeded_file

# sha256 of the seeded files 5cd7306 wrote (before the kinds were modules): an mlp's bytes never change
PINNED = [
    (MlpSpec(hidden=[32]), 64, 10, "263a3f5db4af8b4066879ef6104bafd6cacb281d11e10448a0cc00ec2f3ab1f2"),
    (MlpSpec(hidden=[]), 5, 3, "1f7efb9211d7e66e43424cd0d341b52711125b6377cd21ee72fcc491c8e5a7ef"),
]


@pytest.mark.parametrize(("spec", "features", "classes", "sha256"), PINNED)
def test_an_mlp_builds_counts_and_writes_the_bytes_it_always_did(
    spec: MlpSpec, features: int, classes: int, sha256: str
) -> None:
    check_kind(spec, features, classes, sha256)


def test_an_mlp_is_registered_and_its_file_says_no_kind() -> None:
    assert "mlp" in MODELS.list()
    _, meta = load_model(seeded_file(MlpSpec(hidden=[4]), 3, 2))
    assert "kind" not in meta.to_strings() and meta.to_strings()["hidden"] == "[4]"


def test_parameter_count_by_hand() -> None:
    assert MlpSpec(hidden=[128, 64]).parameter_count(DataShape(64, 10)) == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize(("features", "classes"), [(0, 2), (3, 0)])
def test_an_mlp_on_an_empty_shape_is_refused_with_the_reason(features: int, classes: int) -> None:
    with pytest.raises(ShapeError, match="bad model shape"):
        MlpSpec().check(DataShape(features, classes))
    with pytest.raises(ValueError, match="bad model shape"):
        build_model(MlpSpec(), features, classes)
