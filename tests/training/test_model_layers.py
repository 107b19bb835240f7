"""The ``layers`` kind: its builder (``training/models/layers.py``) and its facts
(``common.models.LayersSpec``, the vocabulary and shape inference of ``common.layers``)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import torch

from swarmtrain.common.models import DataShape, LayersSpec, ModelSpec
from swarmtrain.common.shapes import ShapeError
from tests.training._kinds import check_shape_kind


def spec(*layers: dict[str, Any], **fields: Any) -> ModelSpec:
    return msgspec.convert({"kind": "layers", "layers": list(layers), **fields}, ModelSpec)


TABLE = DataShape(features=6, classes=3)
RESIDUAL_MLP = spec(
    {"type": "linear", "out": 16},
    {"type": "residual", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 16}, {"type": "gelu"}]},
    {"type": "residual", "layers": [{"type": "batchnorm"}, {"type": "dropout", "p": 0.1}, {"type": "silu"}]},
    {"type": "linear", "out": 3},
)
CONVNET = spec(
    {"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
    {"type": "batchnorm"},
    {"type": "relu"},
    {"type": "residual", "layers": [{"type": "conv2d", "out": 4, "kernel": 3, "padding": 1}, {"type": "tanh"}]},
    {"type": "maxpool2d", "kernel": 2},
    {"type": "avgpool2d", "kernel": 2},
    {"type": "global_avg_pool"},
    {"type": "linear", "out": 5},
)
CONV1D = spec(
    {"type": "reshape", "shape": [2, 3]},
    {"type": "conv1d", "out": 4, "kernel": 2},
    {"type": "maxpool1d", "kernel": 2},
    {"type": "avgpool1d", "kernel": 1},
    {"type": "flatten"},
    {"type": "sigmoid"},
    {"type": "linear", "out": 3},
)
TOKENS = DataShape(features=8, classes=2, vocab=30)
ATTENTION = spec(
    {"type": "embedding", "dim": 8},
    {"type": "residual", "layers": [{"type": "layernorm"}, {"type": "attention", "heads": 2}]},
    {"type": "mean_tokens"},
    {"type": "linear", "out": 2},
    context=8,
)
CAUSAL_LM = spec(
    {"type": "embedding", "dim": 8},
    {"type": "residual", "layers": [{"type": "attention", "heads": 2, "causal": True}]},
    {"type": "linear", "out": 30},
    context=8,
)


def test_a_residual_mlp_on_a_table() -> None:
    check_shape_kind(RESIDUAL_MLP, TABLE, torch.randn(4, 6), (4, 3))


def test_convolutions_on_an_image() -> None:
    check_shape_kind(CONVNET, DataShape(features=48, classes=5, image=(3, 4, 4)), torch.randn(2, 48), (2, 5))


def test_a_reshape_and_one_dimensional_convolutions() -> None:
    check_shape_kind(CONV1D, TABLE, torch.randn(4, 6), (4, 3))


def test_attention_on_tokens() -> None:
    check_shape_kind(ATTENTION, TOKENS, torch.randint(0, 30, (3, 8)), (3, 2))
    lm = DataShape(features=8, classes=0, task="language_modeling", vocab=30)
    check_shape_kind(CAUSAL_LM, lm, torch.randint(0, 30, (3, 8)), (3, 8, 30))


@pytest.mark.parametrize(
    ("layers", "reason"),
    [
        ([{"type": "linear", "out": 4}], r"the layers end in \[4\], but this dataset needs \[3\]"),
        ([{"type": "conv2d", "out": 4}, {"type": "linear", "out": 3}], r"layer 0 \(conv2d\): conv2d takes \(C, H, W\)"),
        (
            [{"type": "linear", "out": 8}, {"type": "residual", "layers": [{"type": "linear", "out": 4}]}],
            r"layer 1: a residual block must end",
        ),
        ([{"type": "reshape", "shape": [4, 2]}], r"layer 0 \(reshape\): reshape to \[4, 2\] needs 8 values"),
        ([{"type": "embedding", "dim": 4}], r"layer 0 \(embedding\): embedding takes token ids"),
        (
            [{"type": "linear", "out": 8}, {"type": "attention", "heads": 3}],
            r"layer 1 \(attention\): attention takes \(L, D\)",
        ),
    ],
)
def test_a_spec_that_does_not_fit_names_the_layer(layers: list[dict[str, Any]], reason: str) -> None:
    with pytest.raises(ShapeError, match=reason):
        spec(*layers).check(TABLE)


def test_nesting_and_length_are_bounded() -> None:
    block: dict[str, Any] = {"type": "relu"}
    for _ in range(6):
        block = {"type": "residual", "layers": [block]}
    with pytest.raises(ShapeError, match=r"layer 1\.0\.0\.0\.0: residual blocks nested deeper than 4"):
        spec({"type": "linear", "out": 3}, block).check(TABLE)
    with pytest.raises(ShapeError, match="at most 256"):
        spec(*[{"type": "relu"}] * 200, {"type": "residual", "layers": [{"type": "relu"}] * 100}).check(TABLE)


@pytest.mark.parametrize(
    ("layer", "where"),
    [
        ({"type": "linear", "out": 1 << 20}, "out"),
        ({"type": "linear", "out": -1}, "out"),
        ({"type": "dropout", "p": float("nan")}, "p"),
        ({"type": "dropout", "p": 1.5}, "p"),
        ({"type": "conv2d", "out": 2, "kernel": 0}, "kernel"),
        ({"type": "import", "module": "os"}, "type"),
    ],
)
def test_bad_arguments_are_refused_by_the_types(layer: dict[str, Any], where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"layers\[0\]"):
        spec(layer)
    assert isinstance(LayersSpec(layers=None), LayersSpec)
