"""What every model kind's test checks: its build has the parameters its contract facts count, a
seeded build gives the file the code before the kinds were modules wrote, and the file reads back."""

from __future__ import annotations

import hashlib

import torch

from swarmtrain.common.models import DataShape, ModelSpec
from swarmtrain.training.model import ModelMetadata, build_model, load_model, model_bytes


def seeded_file(spec: ModelSpec, features: int, classes: int, seed: int = 3) -> bytes:
    torch.manual_seed(seed)
    model = build_model(spec, features, classes)
    meta = ModelMetadata.for_spec(
        spec,
        classes=[str(i) for i in range(classes)],
        feature_names=[f"p{i}" for i in range(features)],
        label_column="d",
    )
    return model_bytes(model, meta)


def check_kind(spec: ModelSpec, features: int, classes: int, sha256: str | None = None) -> None:
    model = build_model(spec, features, classes)
    assert spec.parameter_count(DataShape(features, classes)) == sum(p.numel() for p in model.parameters())
    assert model(torch.randn(2, features)).shape == (2, classes)
    data = seeded_file(spec, features, classes)
    if sha256 is not None:
        assert hashlib.sha256(data).hexdigest() == sha256
    loaded, meta = load_model(data)
    assert meta.spec() == spec and model_bytes(loaded, meta) == data
