"""Sessions: request (JSON and one-shot form), validation, ownership, reads and the model download."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from swarmtrain.common import bus
from swarmtrain.common.events import (
    Hyperparameters,
    PeerDone,
    PeerLocked,
    SessionCompleted,
    SessionRequested,
    SessionStarted,
    decode_event,
)
from swarmtrain.gateway.state import Gateway
from tests.gateway.conftest import Append
from tests.gateway.helpers import HP, Client, Headers, small_csv, stored_objects, upload

OnlinePeers = Callable[[int], Awaitable[list[str]]]


@pytest.fixture
async def dataset_id(client: Client, alice: Headers) -> str:
    r = await upload(client, alice, small_csv(rows=40, classes=3))
    assert r.status_code == 201, r.text
    return str(r.json()["dataset_id"])


def session_body(dataset_id: str, num_peers: int = 2, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset_id": dataset_id,
        "num_peers": num_peers,
        "strategy": "sweep",
        "model": {"kind": "mlp", "hidden": [16, 8]},
        "hyperparameters": [HP] * num_peers,
        "validation_split": 0.2,
        "seed": 7,
    }
    return body | overrides


async def requested(gateway: Gateway, session_id: str) -> SessionRequested:
    js: JetStreamContext = gateway.js
    msg = await js.get_last_msg(bus.EVENTS_STREAM, f"session.{session_id}.events")
    assert msg.data is not None
    event = decode_event(msg.data)
    assert isinstance(event, SessionRequested)
    return event


async def test_request_a_session(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(2)
    hps: list[dict[str, Any]] = [
        {"epochs": 1, "batch_size": 8, "lr": 0.1},
        {"epochs": 3, "batch_size": 16, "lr": 0.001},
    ]
    r = await client.post("/sessions", json=session_body(dataset_id, hyperparameters=hps), headers=alice)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "queued"

    event = await requested(gateway, created["session_id"])
    dataset = await gateway.pool.fetchrow("SELECT * FROM datasets WHERE dataset_id = $1", dataset_id)
    assert (event.dataset_uri, event.dataset_sha256, event.label_column) == (
        dataset["uri"],
        dataset["sha256"],
        "label",
    )
    assert event.hyperparameters == [Hyperparameters(**h) for h in hps]
    assert (event.num_peers, event.model.hidden, event.validation_split, event.seed) == (2, [16, 8], 0.2, 7)

    r = await client.get(f"/sessions/{created['session_id']}", headers=alice)
    assert r.status_code == 200
    session = r.json()
    assert {k: session[k] for k in ("session_id", "status", "strategy", "num_peers", "dataset_id")} == {
        "session_id": created["session_id"],
        "status": "queued",
        "strategy": "sweep",
        "num_peers": 2,
        "dataset_id": dataset_id,
    }
    assert session["peers"] == [] and session["best_peer_id"] is None and session["model_available"] is False
    assert session["created_at"]


async def test_one_hyperparameter_object_applies_to_every_peer(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(3)
    body = session_body(dataset_id, 3, hyperparameters=HP)
    del body["model"], body["validation_split"], body["seed"]
    r = await client.post("/sessions", json=body, headers=alice)
    assert r.status_code == 201, r.text
    event = await requested(gateway, r.json()["session_id"])
    assert event.hyperparameters == [Hyperparameters(**HP)] * 3
    assert (event.model.hidden, event.validation_split, event.seed) == ([128, 64], 0.2, 0)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"hyperparameters": [HP | {"epochs": 0}] * 2}, "hyperparameters[0].epochs must be at least 1"),
        ({"hyperparameters": HP | {"batch_size": 0}}, "hyperparameters.batch_size must be at least 1"),
        ({"hyperparameters": [HP, HP | {"lr": 0}]}, "hyperparameters[1].lr must be a positive"),
        ({"hyperparameters": [HP, HP | {"lr": -0.1}]}, "lr must be a positive"),
        ({"hyperparameters": [HP]}, "1 entries for 2 peers"),
        ({"hyperparameters": [HP] * 3}, "3 entries for 2 peers"),
        ({"num_peers": 0, "hyperparameters": []}, "num_peers must be between 1"),
        ({"validation_split": 0}, "validation_split"),
        ({"validation_split": 0.95}, "validation_split"),
        ({"model": {"kind": "mlp", "hidden": [16, 0]}}, "model.hidden"),
        ({"model": {"kind": "cnn"}}, "unknown model kind"),
        ({"strategy": "fedavg"}, "unknown strategy 'fedavg'"),
        ({"hyperparameters": [HP | {"epochs": 1.5}] * 2}, "Expected `int`"),
        ({"colour": "blue"}, "unknown field `colour`"),
    ],
)
async def test_bad_session_request_is_400(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, overrides: dict[str, Any], needle: str
) -> None:
    await online_peers(2)
    r = await client.post("/sessions", json=session_body(dataset_id) | overrides, headers=alice)
    assert r.status_code == 400, r.text
    assert needle in r.json()["detail"]


async def test_non_finite_lr_is_400(client: Client, alice: Headers, dataset_id: str) -> None:
    raw = json.dumps(session_body(dataset_id, 1, hyperparameters=HP)).replace('"lr": 0.01', '"lr": 1e999')
    r = await client.post("/sessions", content=raw, headers={**alice, "Content-Type": "application/json"})
    assert r.status_code == 400


async def test_unknown_or_someone_elses_dataset_is_404(
    client: Client, alice: Headers, bob: Headers, dataset_id: str, online_peers: OnlinePeers
) -> None:
    await online_peers(2)
    r = await client.post("/sessions", json=session_body("no-such-dataset"), headers=alice)
    assert r.status_code == 404
    r = await client.post("/sessions", json=session_body(dataset_id), headers=bob)
    assert r.status_code == 404
    assert "no dataset" in r.json()["detail"]


async def test_not_enough_online_peers(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, append: Append
) -> None:
    r = await client.post("/sessions", json=session_body(dataset_id, 1), headers=alice)
    assert r.status_code == 400
    assert r.json()["detail"] == "not enough online peers: 1 requested, 0 idle online"

    peers = await online_peers(3)
    await append(PeerLocked(peer_id=peers[0], session_id="another-session"))  # busy peers are not idle
    r = await client.post("/sessions", json=session_body(dataset_id, 3), headers=alice)
    assert r.status_code == 400
    assert "not enough online peers" in r.json()["detail"] and "2 idle" in r.json()["detail"]
    assert (await client.post("/sessions", json=session_body(dataset_id, 2), headers=alice)).status_code == 201


async def test_list_is_mine_newest_first(
    client: Client, alice: Headers, bob: Headers, dataset_id: str, online_peers: OnlinePeers
) -> None:
    await online_peers(2)
    ids = []
    for _ in range(3):
        r = await client.post("/sessions", json=session_body(dataset_id), headers=alice)
        ids.append(r.json()["session_id"])
    r = await client.get("/sessions", headers=alice)
    assert r.status_code == 200
    assert [s["session_id"] for s in r.json()] == ids[::-1]
    assert (await client.get("/sessions", headers=bob)).json() == []
    assert (await client.get(f"/sessions/{ids[0]}", headers=bob)).status_code == 404
    assert (await client.get(f"/sessions/{ids[0]}/model", headers=bob)).status_code == 404
    assert (await client.get("/sessions/nope", headers=alice)).status_code == 404


async def test_progress_results_and_model_download(
    client: Client,
    alice: Headers,
    dataset_id: str,
    online_peers: OnlinePeers,
    append: Append,
    gateway: Gateway,
) -> None:
    peers = await online_peers(2)
    r = await client.post("/sessions", json=session_body(dataset_id, hyperparameters=HP), headers=alice)
    sid = r.json()["session_id"]
    r = await client.get(f"/sessions/{sid}/model", headers=alice)
    assert r.status_code == 404 and "no model yet" in r.json()["detail"]

    # What the scheduler and the peers would append.
    weights = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    model = gateway.store.put_bytes(f"sessions/{sid}/{peers[1]}.safetensors", weights)
    hp = Hyperparameters(**HP)
    done: dict[str, Any] = {
        "epochs": 2,
        "loss": 0.5,
        "accuracy": 0.8,
        "train_seconds": 1.0,
        "model_sha256": model.sha256,
    }
    await append(
        SessionStarted(session_id=sid, assignments={p: hp for p in peers}),
        PeerDone(session_id=sid, peer_id=peers[0], model_uri="file:///x", val_accuracy=0.5, **done),
        PeerDone(session_id=sid, peer_id=peers[1], model_uri=model.uri, val_accuracy=0.9, **done),
        SessionCompleted(session_id=sid, best_peer_id=peers[1], best_val_accuracy=0.9, model_uri=model.uri),
    )
    session = (await client.get(f"/sessions/{sid}", headers=alice)).json()
    assert session["status"] == "completed"
    assert session["best_peer_id"] == peers[1] and session["model_available"] is True
    assert [(p["peer_id"], p["status"], p["val_accuracy"]) for p in session["peers"]] == [
        (peers[0], "done", 0.5),
        (peers[1], "done", 0.9),
    ]
    assert session["peers"][0]["hyperparameters"] == HP
    assert set(session["peers"][0]) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}

    r = await client.get(f"/sessions/{sid}/model", headers=alice)
    assert r.status_code == 200
    assert r.content == weights
    assert r.headers["content-type"] == "application/octet-stream"
    assert f'filename="{sid}.safetensors"' in r.headers["content-disposition"]


async def test_start_uploads_and_requests_in_one_go(
    client: Client, alice: Headers, online_peers: OnlinePeers, digits_csv: bytes, gateway: Gateway
) -> None:
    await online_peers(3)
    hps = [HP, HP | {"lr": 0.1}, HP | {"epochs": 1}]
    r = await client.post(
        "/sessions/start",
        files={"file": ("digits.csv", digits_csv, "text/csv")},
        data={"num_peers": "3", "hyperparameters": json.dumps(hps)},
        headers=alice,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "queued" and body["dataset_id"]
    event = await requested(gateway, body["session_id"])
    assert event.dataset_id == body["dataset_id"] and event.hyperparameters == [Hyperparameters(**h) for h in hps]
    session = (await client.get(f"/sessions/{body['session_id']}", headers=alice)).json()
    assert session["dataset_id"] == body["dataset_id"]


@pytest.mark.parametrize(
    ("form", "csv", "peers", "needle"),
    [
        ({"num_peers": "2", "hyperparameters": "[{"}, small_csv(), 2, "hyperparameters is not valid JSON"),
        ({"num_peers": "2", "hyperparameters": json.dumps([HP])}, small_csv(), 2, "1 entries for 2 peers"),
        ({"num_peers": "2", "hyperparameters": json.dumps(HP)}, small_csv(rows=5), 2, "too few rows"),
        ({"num_peers": "2", "hyperparameters": json.dumps(HP)}, small_csv(), 1, "not enough online peers"),
        (
            {"num_peers": "1", "hyperparameters": json.dumps(HP), "label_column": "y"},
            small_csv(),
            1,
            "no label column 'y'",
        ),
    ],
)
async def test_start_rejects_and_leaves_nothing(
    client: Client,
    alice: Headers,
    online_peers: OnlinePeers,
    blob_dir: Path,
    form: dict[str, str],
    csv: bytes,
    peers: int,
    needle: str,
) -> None:
    await online_peers(peers)
    r = await client.post("/sessions/start", files={"file": ("d.csv", csv, "text/csv")}, data=form, headers=alice)
    assert r.status_code == 400, r.text
    assert needle in r.json()["detail"]
    assert stored_objects(blob_dir) == []
    assert (await client.get("/sessions", headers=alice)).json() == []
