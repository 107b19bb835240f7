"""The ``transformer`` kind: its builder (``training/models/transformer.py``) and its facts
(``common.models.TransformerSpec``): a causal decoder with tied embeddings for language modelling,
a mean-pooling encoder otherwise."""

from __future__ import annotations

import pytest
import torch

from swarmtrain.common.models import DataShape, TransformerSpec
from swarmtrain.common.shapes import ShapeError
from swarmtrain.training.model import build_model
from tests.training._kinds import check_shape_kind

LM = DataShape(features=16, classes=0, task="language_modeling", vocab=50)
TEXT = DataShape(features=16, classes=3, vocab=50)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_language_model_gives_logits_per_position(positions: str) -> None:
    spec = TransformerSpec(layers=2, d_model=16, heads=4, context=16, positions=positions)  # type: ignore[arg-type]
    check_shape_kind(spec, LM, torch.randint(0, 50, (2, 16)), (2, 16, 50))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_text_classifier_pools_into_classes(positions: str) -> None:
    spec = TransformerSpec(layers=1, d_model=8, heads=2, context=16, positions=positions)  # type: ignore[arg-type]
    check_shape_kind(spec, TEXT, torch.randint(0, 50, (4, 16)), (4, 3))


def test_a_regression_gives_one_output_a_row() -> None:
    shape = DataShape(features=16, classes=1, task="regression", vocab=50)
    check_shape_kind(
        TransformerSpec(layers=1, d_model=8, heads=2, context=16), shape, torch.randint(0, 50, (2, 16)), (2, 1)
    )


def test_embeddings_are_tied_and_the_decoder_is_causal() -> None:
    torch.manual_seed(0)
    model = build_model(TransformerSpec(layers=1, d_model=8, heads=2, context=8), 8, 0, LM).eval()
    names = [name for name, _ in model.named_parameters()]
    assert not any("head" in name for name in names)
    ids = torch.randint(0, 50, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 50
    torch.testing.assert_close(model(ids)[:, :5], model(changed)[:, :5])  # the future is not seen
    assert not torch.allclose(model(ids)[:, 5:], model(changed)[:, 5:])


def test_parameter_count_by_hand() -> None:
    d, v, n, h = 8, 50, 16, 32
    block = 4 * d + 4 * d * d + 4 * d + d * h + h + h * d + d
    assert (
        TransformerSpec(layers=2, d_model=d, heads=2, context=n).parameter_count(LM)
        == v * d + n * d + 2 * block + 2 * d
    )


@pytest.mark.parametrize(
    ("spec", "shape", "reason"),
    [
        (TransformerSpec(), DataShape(features=10, classes=2), "takes token ids"),
        (TransformerSpec(d_model=10, heads=4), LM, "must divide d_model"),
        (TransformerSpec(d_model=12, heads=4, positions="rotary"), LM, "even head width"),
    ],
)
def test_a_transformer_that_cannot_be_built_says_why(spec: TransformerSpec, shape: DataShape, reason: str) -> None:
    with pytest.raises(ShapeError, match=reason):
        spec.check(shape)
