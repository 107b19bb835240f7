"""A regression end to end on `swarmtrain up` as processes: scikit-learn's diabetes table as
Parquet (a float target), its range shown by GET /datasets/{id}, a sweep and a fedavg session to
completed whose models beat predicting the mean, the model downloaded with its one output."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load

from swarmtrain.common import shapes
from swarmtrain.training.model import load_model
from tests.factories import session_body
from tests.training.formatdata import diabetes, diabetes_parquet, diabetes_parts, parquet_bytes, table_parquet

from .conftest import Api, Stack

HP = {"epochs": 25, "batch_size": 32, "lr": 0.01}
SEED = 5


def _mean_mse() -> float:
    """The validation MSE of predicting the training rows' mean, on the session's split."""
    _, y, _ = diabetes()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED)).numpy()
    n_val = shapes.validation_rows(len(y), 0.2)
    val, train = y.astype(np.float32)[perm[:n_val]], y.astype(np.float32)[perm[n_val:]]
    return float(((val - train.mean()) ** 2).mean())


def _body(dataset_id: str, strategy: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"rounds": 2} if strategy == "fedavg" else {}
    hps: Any = [HP, {**HP, "lr": 0.003}] if strategy == "sweep" else {**HP, "epochs": 12}
    return session_body(
        dataset_id, 2, hps, strategy=strategy, model={"kind": "mlp", "hidden": [32]}, seed=SEED, **extra
    )


async def test_a_regression_on_a_parquet_table(stack: Stack, api: Api) -> None:
    resp = await api.client.post(
        "/datasets",
        files={"file": ("diabetes.parquet", diabetes_parquet(), "application/octet-stream")},
        data={"label_column": "progression"},
    )
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    _, y, _ = diabetes()
    assert (ds["format"], ds["target"], ds["rows"], ds["features"], ds["classes"]) == (
        "parquet",
        "regression",
        442,
        10,
        0,
    )
    assert ds["target_range"] == [float(y.min()), float(y.max())]
    shown = (await api.client.get(f"/datasets/{ds['dataset_id']}")).json()
    assert (shown["target"], shown["target_range"]) == ("regression", ds["target_range"])

    mean_mse = _mean_mse()
    await api.wait_idle_peers(2)
    for strategy in ("sweep", "fedavg"):
        resp = await api.client.post("/sessions", json=_body(ds["dataset_id"], strategy))
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        done = await api.wait_ended(sid, timeout=240)
        assert done["status"] == "completed", done
        assert done["task"] == "regression"
        assert done["model_available"], done
        best = min(p["val_loss"] for p in done["peers"] if p["val_loss"] is not None)
        assert best < 0.8 * mean_mse, (best, mean_mse, done["peers"])  # MSE well below the mean's
        assert done["val_accuracy"] is not None and done["val_accuracy"] > 0.2  # R², checked by the scheduler
        got = await api.client.get(f"/sessions/{sid}/model")
        assert got.status_code == 200
        tensors = load(got.content)
        assert (1, 32) in {tuple(t.shape) for t in tensors.values()}  # one output
        assert any(name.endswith(".mean") and t.numel() == 1 for name, t in tensors.items())  # the target's scale
        await api.wait_idle_peers(2, timeout=30)


async def _upload(api: Api, name: str, raw: bytes, label: str) -> str:
    resp = await api.client.post(
        "/datasets", files={"file": (name, raw, "application/octet-stream")}, data={"label_column": label}
    )
    assert resp.status_code == 201, resp.text
    dataset_id: str = resp.json()["dataset_id"]
    return dataset_id


async def test_a_session_validates_on_the_users_own_validation_set(stack: Stack, api: Api) -> None:
    train_raw, val_raw = diabetes_parts()
    train_id = await _upload(api, "train.parquet", train_raw, "progression")
    val_id = await _upload(api, "val.parquet", val_raw, "progression")
    classes_id = await _upload(api, "table.parquet", table_parquet(rows=100, classes=3), "label")
    x, y, names = diabetes()
    fewer = parquet_bytes({**{n: x[:50, i] for i, n in enumerate(names[:5])}, "progression": y[:50]})
    fewer_id = await _upload(api, "fewer.parquet", fewer, "progression")

    async def refused(body: dict[str, Any], needle: str) -> None:
        resp = await api.client.post("/sessions", json=body)
        assert resp.status_code == 400, resp.text
        assert needle in resp.json()["detail"], resp.json()

    model = {"kind": "mlp", "hidden": [32]}
    await refused(session_body(train_id, 1, HP, model=model, validation_dataset_id=classes_id), "its label column")
    await refused(session_body(train_id, 1, HP, model=model, validation_dataset_id=fewer_id), "its features (5)")
    await refused(session_body(train_id, 1, HP, model=model, validation_dataset_id=train_id), "another dataset")
    missing = await api.client.post("/sessions", json=session_body(train_id, 1, HP, validation_dataset_id="nope"))
    assert missing.status_code == 404, missing.text

    await api.wait_idle_peers(2)
    val_y = y[352:].astype(np.float32)
    mean_mse = float(((val_y - y[:352].astype(np.float32).mean()) ** 2).mean())
    for strategy in ("sweep", "fedavg"):
        body = _body(train_id, strategy) | {"validation_dataset_id": val_id}
        resp = await api.client.post("/sessions", json=body)
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        done = await api.wait_ended(sid, timeout=240)
        assert done["status"] == "completed", done
        assert done["validation_dataset_id"] == val_id
        assert done["model_available"]
        # the model measured on the 90 rows of the other file: the download predicts them as reported
        got = await api.client.get(f"/sessions/{sid}/model")
        model_nn, _ = load_model(got.content)
        with torch.no_grad():
            predicted = model_nn(torch.from_numpy(x[352:].astype(np.float32))).reshape(-1).numpy()
        mse = float(((predicted - val_y) ** 2).mean())
        assert mse < 0.8 * mean_mse, (mse, mean_mse)
        reported = [p["val_loss"] for p in done["peers"] if p["val_loss"] is not None]
        assert any(abs(r - mse) <= 1e-3 * mse for r in reported) or strategy == "fedavg", (reported, mse)
        assert done["val_accuracy"] == pytest.approx(1 - mse / float(((val_y - val_y.mean()) ** 2).mean()), rel=1e-3)
        await api.wait_idle_peers(2, timeout=30)
