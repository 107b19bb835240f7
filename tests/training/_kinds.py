"""What the newer kinds' tests share: a build on a ``DataShape`` has exactly the contract's
parameter count, the output the docstring says, and its file reads back to the same bytes."""

from __future__ import annotations

import torch

from swarmtrain.common.models import DataShape, ModelSpec
from swarmtrain.training.model import ModelMetadata, build_model, load_model, model_bytes


def check_shape_kind(spec: ModelSpec, shape: DataShape, batch: torch.Tensor, out: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(spec, shape.features, shape.classes, shape)
    assert spec.parameter_count(shape) == sum(p.numel() for p in model.parameters())
    costs = spec.costs(shape)
    assert costs.parameters == spec.parameter_count(shape) and costs.activations > 0 and costs.flops > 0
    model.eval()
    assert tuple(model(batch).shape) == out
    meta = ModelMetadata.for_spec(
        spec,
        classes=[str(i) for i in range(shape.classes)],
        feature_names=[f"f{i}" for i in range(shape.features)],
        label_column="y",
        shape=shape,
    )
    data = model_bytes(model, meta)
    loaded, back = load_model(data)
    assert back.spec() == spec and back.data_shape() == shape
    assert model_bytes(loaded, back) == data
    torch.testing.assert_close(loaded(batch), model(batch))
