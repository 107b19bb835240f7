"""The model kinds end to end on `swarmtrain up` as processes: a ``resnet`` sweep on an archive of
images (scikit-learn's digits as 8x8 PNGs, no input_shape: the upload's [C, H, W]) and a ``layers``
model with residual blocks on a Parquet table, each to completed; the model downloaded, rebuilt
by ``load_model`` from its file alone, and its predictions those the peers' figures describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import swarmtrain
from swarmtrain.training.model import load_model
from tests.training.formatdata import archive, digit_images, table_parquet

from .conftest import Api, Stack

RESIDUAL = [
    {"type": "linear", "out": 32},
    {"type": "residual", "layers": [{"type": "layernorm"}, {"type": "linear", "out": 32}, {"type": "gelu"}]},
    {"type": "residual", "layers": [{"type": "batchnorm"}, {"type": "linear", "out": 32}, {"type": "relu"}]},
    {"type": "linear", "out": 3},
]
CASES = {
    "resnet": (
        lambda: archive(digit_images(400)),
        "digits.zip",
        "images",
        {"kind": "resnet", "depth": 1, "width": 8, "stages": 2},
        (1, 10),
    ),
    "layers": (
        lambda: table_parquet(rows=300, classes=3),
        "table.parquet",
        "parquet",
        {"kind": "layers", "layers": RESIDUAL},
        (1, 3),
    ),
}


@pytest.mark.parametrize("kind", sorted(CASES))
async def test_a_kind_trains_to_completed_and_loads(stack: Stack, api: Api, kind: str, tmp_path: Path) -> None:
    make, name, data_format, model, (_, classes) = CASES[kind]
    resp = await api.client.post(
        "/datasets", files={"file": (name, make(), "application/octet-stream")}, data={"format": data_format}
    )
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    await api.wait_idle_peers(2)
    hp: dict[str, Any] = {"epochs": 4, "batch_size": 32, "lr": 0.005}
    body = {
        "dataset_id": ds["dataset_id"],
        "num_peers": 2,
        "strategy": "sweep",
        "model": model,
        "hyperparameters": [hp, hp | {"lr": 0.002}],
        "validation_split": 0.2,
        "seed": 5,
    }
    resp = await api.client.post("/sessions", json=body)
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    done = await api.wait_ended(sid, timeout=240)
    assert done["status"] == "completed", done
    assert done["model_available"], done
    best = max(p["val_accuracy"] or 0 for p in done["peers"])
    assert best > 2 / classes, done["peers"]  # well above chance: the peers built and trained the kind
    got = await api.client.get(f"/sessions/{sid}/model")
    assert got.status_code == 200
    _, meta = load_model(got.content)
    assert meta.spec().kind == kind and len(meta.classes) == classes
    path = tmp_path / "model.safetensors"
    path.write_bytes(got.content)
    net = swarmtrain.load_model(path)  # the public function: the module from the file alone
    x = torch.randn(5, ds["features"])
    assert isinstance(net, torch.nn.Module) and net(x).shape == (5, classes)
    await api.wait_idle_peers(2, timeout=30)
