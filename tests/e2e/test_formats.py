"""Every data format end to end on `swarmtrain up` as processes: upload, a sweep and a fedavg
session to completed, the model downloaded. Data made in the test: a Parquet table with a
categorical column, and scikit-learn's digits as 8x8 images in an .npz and as a zip of PNGs."""

from __future__ import annotations

from typing import Any

import pytest
from safetensors.torch import load

from tests.training.formatdata import archive, digit_images, digits_npz, table_parquet

from .conftest import Api, Stack

CASES = {
    "parquet": (
        lambda: table_parquet(rows=300, classes=3),
        "table.parquet",
        {"kind": "mlp", "hidden": [32]},
        (300, 6, 3),
    ),
    "npz": (
        lambda: digits_npz(channels_last=True),
        "digits.npz",
        {"kind": "cnn", "input_shape": [1, 8, 8], "channels": [8], "hidden": [32]},
        (1797, 64, 10),
    ),
    "images": (
        lambda: archive(digit_images(600)),
        "digits.zip",
        {"kind": "cnn", "input_shape": [1, 8, 8], "channels": [8], "hidden": [32]},
        (600, 64, 10),
    ),
}


def body(dataset_id: str, strategy: str, model: dict[str, Any]) -> dict[str, Any]:
    hp = {"epochs": 3, "batch_size": 32, "lr": 0.005}
    return {
        "dataset_id": dataset_id,
        "num_peers": 2,
        "strategy": strategy,
        "model": model,
        "hyperparameters": [hp, hp] if strategy == "sweep" else hp,
        "validation_split": 0.2,
        "seed": 5,
        **({"rounds": 2} if strategy == "fedavg" else {}),
    }


@pytest.mark.parametrize("data_format", sorted(CASES))
async def test_upload_sweep_fedavg_and_the_model(stack: Stack, api: Api, data_format: str) -> None:
    make, name, model, (rows, features, classes) = CASES[data_format]
    resp = await api.client.post(
        "/datasets", files={"file": (name, make(), "application/octet-stream")}, data={"format": data_format}
    )
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert (ds["format"], ds["rows"], ds["features"], ds["classes"]) == (data_format, rows, features, classes)
    await api.wait_idle_peers(2)
    for strategy in ("sweep", "fedavg"):
        resp = await api.client.post("/sessions", json=body(ds["dataset_id"], strategy, model))
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        done = await api.wait_ended(sid)
        assert done["status"] == "completed", done
        assert done["model_available"], done
        # far above chance (1/3, 1/10): the peers read the format as the gateway checked it
        assert max(p["val_accuracy"] or 0 for p in done["peers"]) > 0.6, done["peers"]
        got = await api.client.get(f"/sessions/{sid}/model")
        assert got.status_code == 200
        shapes = {tuple(t.shape) for t in load(got.content).values()}
        assert (classes, 32) in shapes, shapes
        await api.wait_idle_peers(2, timeout=30)
