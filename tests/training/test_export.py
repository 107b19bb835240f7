"""A model file exported to ONNX gives onnxruntime's outputs equal to torch's, for every kind; and
``load`` rebuilds the module from the file alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from swarmtrain.common.models import DataShape, ModelSpec
from swarmtrain.training.export import example_input, load, to_onnx
from swarmtrain.training.model import ModelMetadata, build_model, model_bytes

ort = pytest.importorskip("onnxruntime")

IMAGE = DataShape(features=48, classes=4, image=(3, 4, 4))
LM = DataShape(features=8, classes=0, task="language_modeling", vocab=40)
CASES: list[tuple[dict[str, Any], DataShape]] = [
    ({"kind": "mlp", "hidden": [16]}, DataShape(6, 3)),
    ({"kind": "cnn", "input_shape": [3, 4, 4], "channels": [4]}, DataShape(48, 4)),
    ({"kind": "resnet", "depth": 1, "width": 4, "stages": 2}, IMAGE),
    ({"kind": "transformer", "layers": 1, "d_model": 16, "heads": 2, "context": 8}, LM),
    ({"kind": "transformer", "layers": 1, "d_model": 16, "heads": 2, "context": 8, "positions": "rotary"}, LM),
    (
        {
            "kind": "layers",
            "layers": [
                {"type": "linear", "out": 8},
                {"type": "residual", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 8}]},
                {"type": "linear", "out": 3},
            ],
        },
        DataShape(6, 3),
    ),
]


@pytest.mark.parametrize(("fields", "shape"), CASES, ids=lambda c: c["kind"] if isinstance(c, dict) else "")
def test_onnx_outputs_equal_torch(tmp_path: Path, fields: dict[str, Any], shape: DataShape) -> None:
    spec = msgspec.convert(fields, ModelSpec)
    torch.manual_seed(1)
    model = build_model(spec, shape.features, shape.classes, shape).eval()
    meta = ModelMetadata.for_spec(
        spec,
        classes=[str(i) for i in range(shape.classes)],
        feature_names=[f"f{i}" for i in range(shape.features)],
        label_column="y",
        shape=shape,
    )
    raw = model_bytes(model, meta)
    out = tmp_path / "model.onnx"
    to_onnx(raw, out)
    x = example_input(meta, batch=5)
    x = torch.randint(0, shape.vocab, x.shape) if shape.tokens else torch.randn(x.shape)
    with torch.no_grad():
        want = load(raw)(x).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["output"], {"input": x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
