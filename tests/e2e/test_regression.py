"""A regression end to end on `swarmtrain up` as processes: scikit-learn's diabetes table as
Parquet (a float target), its range shown by GET /datasets/{id}, a sweep and a fedavg session to
completed whose models beat predicting the mean, the model downloaded with its one output."""

from __future__ import annotations

from typing import Any

import numpy as np
from safetensors.torch import load

from swarmtrain.common import shapes
from tests.factories import session_body
from tests.training.formatdata import diabetes, diabetes_parquet

from .conftest import Api, Stack

HP = {"epochs": 25, "batch_size": 32, "lr": 0.01}
SEED = 5


def _mean_mse() -> float:
    """The validation MSE of predicting the training rows' mean, on the session's split."""
    import torch

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
