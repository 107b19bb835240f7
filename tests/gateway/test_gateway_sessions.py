"""Sessions: request (JSON and one-shot form), validation, ownership, reads and the model download."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext

from swarmtrain.common import bus
from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerLocked,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    UpdateRejected,
    decode_event,
)
from swarmtrain.common.models import CnnSpec
from swarmtrain.common.settings import Settings
from swarmtrain.gateway import create_app
from swarmtrain.gateway.state import Gateway
from tests import factories
from tests.gateway.conftest import Append, OnlinePeers
from tests.gateway.helpers import (
    HP,
    Client,
    Headers,
    serving,
    sign_up_and_in,
    small_csv,
    stored_objects,
    upload,
)


@pytest.fixture
async def dataset_id(client: Client, alice: Headers) -> str:
    r = await upload(client, alice, small_csv(rows=40, classes=3))
    assert r.status_code == 201, r.text
    return str(r.json()["dataset_id"])


def session_body(dataset_id: str, num_peers: int = 2, **overrides: Any) -> dict[str, Any]:
    """This module's sweep: a set of ``HP`` per peer, a small MLP, seed 7; ``overrides`` on top."""
    fields: dict[str, Any] = {
        "hyperparameters": [HP] * num_peers,
        "strategy": "sweep",
        "model": {"kind": "mlp", "hidden": [16, 8]},
        "validation_split": 0.2,
        "seed": 7,
    }
    return factories.session_body(dataset_id, num_peers, **(fields | overrides))


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


async def test_how_a_run_trains_reaches_the_request_whole(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(2)
    tuned = HP | {
        "optimizer": "sgd",
        "momentum": 0.5,
        "weight_decay": 0.05,
        "grad_clip_norm": 1.0,
        "lr_schedule": "cosine",
        "warmup_steps": 10,
        "grad_accumulation": 2,
    }
    r = await client.post("/sessions", json=session_body(dataset_id, hyperparameters=[HP, tuned]), headers=alice)
    assert r.status_code == 201, r.text
    event = await requested(gateway, r.json()["session_id"])
    assert event.hyperparameters == [Hyperparameters(**HP), Hyperparameters(**tuned)]
    assert event.hyperparameters[0].optimizer == "adamw" and event.hyperparameters[1].grad_accumulation == 2


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"hyperparameters": [HP | {"optimizer": "lbfgs"}] * 2}, "Invalid enum value 'lbfgs'"),
    ({"hyperparameters": [HP | {"weight_decay": -0.1}] * 2}, "hyperparameters[0].weight_decay must be at least 0"),
    ({"hyperparameters": [HP | {"grad_clip_norm": 0}] * 2}, "hyperparameters[0].grad_clip_norm must be greater than 0"),
    (
        {"hyperparameters": [HP | {"grad_accumulation": 0}] * 2},
        "hyperparameters[0].grad_accumulation must be at least 1",
    ),
    ({"hyperparameters": [HP | {"lr_schedule": "step"}] * 2}, "Invalid enum value 'step'"),
    ({"hyperparameters": [HP | {"epochs": 0}] * 2}, "hyperparameters[0].epochs must be at least 1"),
    ({"hyperparameters": HP | {"batch_size": 0}}, "hyperparameters.batch_size must be at least 1"),
    ({"hyperparameters": [HP, HP | {"lr": 0}]}, "hyperparameters[1].lr must be greater than 0"),
    ({"hyperparameters": [HP, HP | {"lr": -0.1}]}, "hyperparameters[1].lr must be greater than 0"),
    ({"hyperparameters": [HP]}, "1 entries for 2 peers"),
    ({"hyperparameters": [HP] * 3}, "3 entries for 2 peers"),
    ({"num_peers": 0, "hyperparameters": []}, "num_peers must be at least 1"),
    ({"validation_split": 0}, "validation_split must be greater than 0"),
    ({"validation_split": 0.95}, "validation_split must be at most 0.9"),
    ({"seed": -1}, "seed must be at least 0"),
    ({"seed": 2**63}, "seed must be at most 9223372036854775807"),
    ({"model": {"kind": "mlp", "hidden": [16, 0]}}, "model.hidden"),
    ({"model": {"kind": "mlp", "hidden": [4] * 33}}, "model.hidden must have at most 32 items"),
    ({"model": {"kind": "unet"}}, "Invalid enum value 'unet'"),
    ({"model": {"kind": "cnn"}}, "a cnn needs model.input_shape"),
    ({"model": {"kind": "cnn", "input_shape": [1, 2]}}, "model.input_shape must have at least 3 items"),
    ({"model": {"kind": "cnn", "input_shape": [1, 1, 0]}}, "model.input_shape[2] must be at least 1"),
    ({"model": {"kind": "cnn", "input_shape": [1, 1, 2], "channels": []}}, "model.channels must have at least 1 item"),
    ({"model": {"kind": "cnn", "input_shape": [1, 1, 3]}}, "input_shape 1x1x3 holds 3 values but the data has 2"),
    ({"model": {"kind": "mlp", "input_shape": [1, 1, 2]}}, "model.input_shape applies to a cnn or resnet only"),
    ({"strategy": "gossip"}, "Invalid enum value 'gossip'"),
    ({"strategy": "fedavg"}, "fedavg takes one hyperparameters object"),
    ({"strategy": "fedavg", "hyperparameters": HP, "rounds": 0}, "rounds must be at least 1"),
    ({"rounds": 3}, "rounds applies to fedavg only"),
    ({"strategy": "fedavg", "hyperparameters": HP, "on_peer_failure": "panic"}, "Invalid enum value 'panic'"),
    ({"strategy": "fedavg", "hyperparameters": HP, "max_update_norm": 0}, "max_update_norm must be greater than 0"),
    ({"strategy": "fedavg", "hyperparameters": HP, "max_update_norm": -1.5}, "max_update_norm must be greater than 0"),
    ({"strategy": "fedavg", "hyperparameters": HP, "max_update_norm": "big"}, "max_update_norm: Expected `float"),
    ({"max_update_norm": 10.0}, "max_update_norm applies to fedavg only"),
    ({"hyperparameters": [HP | {"epochs": 1.5}] * 2}, "hyperparameters[0].epochs: Expected `int`"),
    ({"colour": "blue"}, "unknown field `colour`"),
    # server-owned fields cannot be set by a request
    ({"owner_id": "someone"}, "unknown field `owner_id`"),
    ({"status": "completed"}, "unknown field `status`"),
    ({"session_id": "0" * 32}, "unknown field `session_id`"),
    ({"model": {"kind": "mlp", "hidden": [8], "owner": "x"}}, "unknown field `owner`"),
    ({"hyperparameters": HP | {"peer_id": "p"}}, "unknown field `peer_id`"),
]


async def test_bad_session_requests_are_400_naming_the_problem(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers
) -> None:
    await online_peers(2)
    wrong: list[tuple[dict[str, Any], object, str]] = []
    for overrides, needle in BAD_REQUESTS:
        r = await client.post("/sessions", json=session_body(dataset_id) | overrides, headers=alice)
        if r.status_code != 400 or needle not in r.json()["detail"]:
            wrong.append((overrides, r.status_code, r.text))
        elif not r.headers["content-type"].startswith("application/problem+json"):
            wrong.append((overrides, "content-type", r.headers["content-type"]))
    assert wrong == []
    assert (await client.get("/sessions", headers=alice)).json() == []


async def test_non_finite_lr_is_400(client: Client, alice: Headers, dataset_id: str) -> None:
    raw = json.dumps(session_body(dataset_id, 1, hyperparameters=HP)).replace('"lr": 0.01', '"lr": 1e999')
    r = await client.post("/sessions", content=raw, headers={**alice, "Content-Type": "application/json"})
    assert r.status_code == 400


async def test_max_update_norm_reaches_the_request_finite_or_not_at_all(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(2)
    body = session_body(dataset_id, strategy="fedavg", hyperparameters=HP, max_update_norm=12.5)
    r = await client.post("/sessions", json=body, headers=alice)
    assert r.status_code == 201, r.text
    assert (await requested(gateway, r.json()["session_id"])).round_options.max_update_norm == 12.5
    del body["max_update_norm"]
    r = await client.post("/sessions", json=body, headers=alice)
    assert (await requested(gateway, r.json()["session_id"])).round_options.max_update_norm is None
    raw = json.dumps(body | {"max_update_norm": 1.0})
    for huge, detail in (("1e999", "Number out of range"), ("1e13", "max_update_norm must be at most")):
        data = raw.replace('"max_update_norm": 1.0', f'"max_update_norm": {huge}')
        r = await client.post("/sessions", content=data, headers={**alice, "Content-Type": "application/json"})
        assert r.status_code == 400 and detail in r.json()["detail"], r.text


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


async def test_the_model_route_serves_only_the_sessions_own_checked_object(
    client: Client,
    alice: Headers,
    dataset_id: str,
    online_peers: OnlinePeers,
    append: Append,
    gateway: Gateway,
    blob_dir: Path,
) -> None:
    """A model URI is a fact's, and facts are written by services; should one name something else
    anyway (appended here straight to the log, as a service credential could), the route serves
    nothing but an object under ``sessions/<that session>/`` whose bytes match the recorded sha256."""
    (peer,) = await online_peers(1)

    async def new_session() -> str:
        r = await client.post("/sessions", json=session_body(dataset_id, 1, hyperparameters=HP), headers=alice)
        assert r.status_code == 201, r.text
        return str(r.json()["session_id"])

    async def complete(sid: str, uri: str, sha256: str, done_uri: str | None = None) -> httpx.Response:
        """The session completed with ``uri`` as its model (the best peer's PeerDone named
        ``done_uri``, by default the same, with ``sha256``); then GET its model."""
        await append(
            SessionStarted(session_id=sid, assignments={peer: Hyperparameters(**HP)}),
            PeerDone(
                session_id=sid,
                peer_id=peer,
                model_uri=uri if done_uri is None else done_uri,
                model_sha256=sha256,
                epochs=2,
                loss=0.5,
                accuracy=0.8,
                train_seconds=1.0,
            ),
            SessionCompleted(session_id=sid, best_peer_id=peer, best_val_accuracy=0.8, model_uri=uri),
        )
        r = await client.get(f"/sessions/{sid}/model", headers=alice)
        assert r.status_code != 500, r.text
        return r

    weights = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    other = await new_session()
    theirs = gateway.store.put_bytes(f"sessions/{other}/{peer}.safetensors", weights)
    r = await complete(other, theirs.uri, theirs.sha256)
    assert r.status_code == 200 and r.content == weights  # that session's own model is served

    environ = await asyncio.to_thread(Path("/proc/self/environ").read_bytes)
    root = blob_dir.as_uri()
    forged = {
        "the gateway's environment": ("file:///proc/self/environ", hashlib.sha256(environ).hexdigest()),
        "a '..' into another session": (f"{root}/sessions/{{sid}}/../{other}/{peer}.safetensors", theirs.sha256),
        "a '..' out of the store": (f"{root}/sessions/{{sid}}/../../../../proc/self/environ", "0" * 64),
        "another session's object": (theirs.uri, theirs.sha256),
        "the session's folder": (f"{root}/sessions/{{sid}}", "0" * 64),
        "another store": ("s3://swarmtrain/sessions/{sid}/m.safetensors", "0" * 64),
        "no URI at all": ("not a uri", "0" * 64),
    }
    for what, (template, sha256) in forged.items():
        sid = await new_session()
        r = await complete(sid, template.format(sid=sid), sha256)
        assert r.status_code == 404, (what, r.status_code, r.text[:200])
        assert "not an object of this session" in r.json()["detail"], what
        assert weights not in r.content and environ[:64] not in r.content

    # its own object, but not the bytes the fact recorded: 409 with the reason, nothing served
    sid = await new_session()
    own = gateway.store.put_bytes(f"sessions/{sid}/{peer}.safetensors", weights)
    r = await complete(sid, own.uri, hashlib.sha256(b"other bytes").hexdigest())
    assert r.status_code == 409 and "does not match the sha256" in r.json()["detail"]
    assert weights not in r.content
    # nor once the object has been replaced after the fact
    gateway.store.put_bytes(f"sessions/{other}/{peer}.safetensors", weights + b" ")
    r = await client.get(f"/sessions/{other}/model", headers=alice)
    assert r.status_code == 409 and weights not in r.content

    # a model whose sha256 no fact records (the best peer's PeerDone named another object)
    sid = await new_session()
    own = gateway.store.put_bytes(f"sessions/{sid}/{peer}.safetensors", weights)
    r = await complete(sid, own.uri, own.sha256, done_uri=f"{root}/sessions/{sid}/elsewhere.safetensors")
    assert r.status_code == 404 and "sha256" in r.json()["detail"]


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
        (
            {"num_peers": "2", "hyperparameters": json.dumps(HP | {"epochs": 0})},
            small_csv(),
            2,
            "hyperparameters.epochs must be at least 1",
        ),
        ({"num_peers": "0", "hyperparameters": json.dumps(HP)}, small_csv(), 2, "num_peers must be at least 1"),
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


# ------------------------------------------------------------------ fedavg, caps


async def test_request_a_fedavg_session(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(3)
    body = session_body(
        dataset_id,
        3,
        strategy="fedavg",
        hyperparameters=HP,
        rounds=4,
        on_peer_failure="continue",
        model={"kind": "cnn", "input_shape": [1, 1, 2], "channels": [4], "hidden": [8]},
    )
    r = await client.post("/sessions", json=body, headers=alice)
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    event = await requested(gateway, sid)
    assert (event.strategy, event.rounds, event.on_peer_failure, event.num_peers) == ("fedavg", 4, "continue", 3)
    assert event.hyperparameters == [Hyperparameters(**HP)] * 3
    assert event.model == CnnSpec(hidden=[8], input_shape=[1, 1, 2], channels=[4])
    session = (await client.get(f"/sessions/{sid}", headers=alice)).json()
    assert (session["strategy"], session["rounds"], session["on_peer_failure"]) == ("fedavg", 4, "continue")
    assert session["round_figures"] == [] and session["val_accuracy"] is None


async def test_fedavg_defaults_and_cnn_default_channels(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(2)
    body = {
        "dataset_id": dataset_id,
        "num_peers": 2,
        "strategy": "fedavg",
        "hyperparameters": HP,
        "model": {"kind": "cnn", "input_shape": [2, 1, 1]},
    }
    r = await client.post("/sessions", json=body, headers=alice)
    assert r.status_code == 201, r.text
    event = await requested(gateway, r.json()["session_id"])
    assert (event.rounds, event.on_peer_failure, event.model.channels) == (1, "reassign", [16, 32])


async def test_fedavg_shards_may_not_be_empty(client: Client, alice: Headers, online_peers: OnlinePeers) -> None:
    r = await upload(client, alice, small_csv(rows=12))  # 12 rows: 2 for validation, 10 to share out
    dataset_id = r.json()["dataset_id"]
    await online_peers(11)
    body = session_body(dataset_id, 11, strategy="fedavg", hyperparameters=HP)
    r = await client.post("/sessions", json=body, headers=alice)
    assert r.status_code == 400
    assert "fedavg: 11 shards of 10 training rows would leave a shard empty" in r.json()["detail"]
    body = session_body(dataset_id, 10, strategy="fedavg", hyperparameters=HP)
    assert (await client.post("/sessions", json=body, headers=alice)).status_code == 201


@pytest.fixture
async def capped(settings: Settings, projector: None) -> AsyncIterator[Client]:
    caps = {
        "max_num_peers": 4,
        "max_epochs": 12,
        "max_rounds": 3,
        "max_model_params": 2_000,
        "max_active_sessions": 2,
    }
    async with serving(create_app(msgspec.structs.replace(settings, **caps))) as client:
        yield client


async def test_caps_on_peers_epochs_rounds_and_model_size(capped: Client, online_peers: OnlinePeers) -> None:
    client = capped
    alice = await sign_up_and_in(client, "alice@example.com")
    dataset_id = (await upload(client, alice, small_csv(rows=40, classes=3))).json()["dataset_id"]
    await online_peers(5)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"num_peers": 5, "hyperparameters": HP}, "num_peers must be between 1 and 4, not 5"),
        ({"hyperparameters": HP | {"epochs": 13}}, "epochs must be at most 12"),
        (
            {"strategy": "fedavg", "rounds": 3, "hyperparameters": HP | {"epochs": 5}},
            "epochs must be at most 4 per round (3 rounds)",
        ),
        ({"strategy": "fedavg", "rounds": 4, "hyperparameters": HP}, "rounds must be between 1 and 3, not 4"),
        # 2 features -> 64 -> 3 classes is 2*64+64 + 64*3+3 = 387 parameters; -> 64 -> 64 -> 3 is 4,547
        ({"model": {"kind": "mlp", "hidden": [64, 64]}}, "the model would have 4,547 parameters on this dataset"),
        ({"model": {"kind": "mlp", "hidden": [65536, 65536]}}, "at most 2,000"),
    ]
    for overrides, needle in cases:
        r = await client.post("/sessions", json=session_body(dataset_id) | overrides, headers=alice)
        assert (r.status_code, needle in r.json()["detail"]) == (400, True), (overrides, r.text)
    body = session_body(dataset_id, hyperparameters=HP, model={"kind": "mlp", "hidden": [64]})
    assert (await client.post("/sessions", json=body, headers=alice)).status_code == 201


async def test_too_many_active_sessions_is_429_until_one_ends(capped: Client, online_peers: OnlinePeers) -> None:
    client = capped
    alice = await sign_up_and_in(client, "alice@example.com")
    bob = await sign_up_and_in(client, "bob@example.com")
    dataset_id = (await upload(client, alice, small_csv())).json()["dataset_id"]
    await online_peers(2)
    body = session_body(dataset_id, 1, hyperparameters=HP)
    first, second, third = await asyncio.gather(*(client.post("/sessions", json=body, headers=alice) for _ in range(3)))
    assert sorted(r.status_code for r in (first, second, third)) == [201, 201, 429]
    refused = next(r for r in (first, second, third) if r.status_code == 429)
    assert "2 queued or running sessions: at most 2" in refused.json()["detail"]
    # another user's room is their own
    bobs = (await upload(client, bob, small_csv())).json()["dataset_id"]
    assert (
        await client.post("/sessions", json=session_body(bobs, 1, hyperparameters=HP), headers=bob)
    ).status_code == 201
    done = next(r for r in (first, second, third) if r.status_code == 201).json()["session_id"]
    assert (await client.post(f"/sessions/{done}/cancel", headers=alice)).status_code == 202
    assert (await client.post("/sessions", json=body, headers=alice)).status_code == 201


# ------------------------------------------------------------------ fedavg figures, metrics


async def test_fedavg_figures_shards_and_final_accuracy(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, append: Append
) -> None:
    peers = await online_peers(3)
    options = {"aggregator": {"name": "median"}, "outer": {"name": "momentum"}, "compression": {"name": "int8"}}
    body = session_body(dataset_id, 2, strategy="fedavg", hyperparameters=HP, rounds=2, **options)
    sid = (await client.post("/sessions", json=body, headers=alice)).json()["session_id"]
    hp = Hyperparameters(**HP)

    def update(rnd: int, peer: str, n: int, loss: float) -> ModelUpdatePublished:
        return ModelUpdatePublished(
            session_id=sid,
            round=rnd,
            peer_id=peer,
            uri=f"file:///r/{rnd}/{peer}",
            sha256="0" * 64,
            num_samples=n,
            loss=loss,
            accuracy=1 - loss,
        )

    await append(
        SessionStarted(session_id=sid, assignments={peers[0]: hp, peers[1]: hp}, shards={peers[0]: 0, peers[1]: 1}),
        update(1, peers[0], 10, 0.5),
        update(1, peers[1], 30, 0.1),
        RoundClosed(
            session_id=sid,
            round=1,
            updates=[RoundUpdate(peer_id=p, uri="u", sha256="0", num_samples=1) for p in peers[:2]],
        ),
        RoundAveraged(
            session_id=sid,
            round=1,
            uri="file:///avg1",
            sha256="1" * 64,
            peer_id=peers[0],
            val_loss=0.3,
            val_accuracy=0.7,
        ),
        PeerFailed(session_id=sid, peer_id=peers[1], reason="missed round 2"),
        ShardReassigned(session_id=sid, shard=1, from_peer_id=peers[1], to_peer_id=peers[2], round=2),
        update(2, peers[0], 10, 0.2),
        update(2, peers[2], 30, 0.2),
        RoundClosed(
            session_id=sid,
            round=2,
            updates=[RoundUpdate(peer_id=p, uri="u", sha256="0", num_samples=1) for p in (peers[0], peers[2])],
            left_out=[peers[1]],
        ),
        UpdateRejected(session_id=sid, round=2, peer_id=peers[2], reason="NaN in fc.weight", reported_by=peers[0]),
        RoundAveraged(
            session_id=sid,
            round=2,
            uri="file:///avg2",
            sha256="2" * 64,
            peer_id=peers[0],
            val_loss=0.2,
            val_accuracy=0.85,
            aggregator="median",
            selected=[peers[0]],
            update_bytes=1234,
        ),
        SessionCompleted(session_id=sid, best_peer_id=peers[0], best_val_accuracy=0.85, model_uri="file:///avg2"),
    )
    session = (await client.get(f"/sessions/{sid}", headers=alice)).json()
    assert session["status"] == "completed" and session["val_accuracy"] == 0.85
    assert {p["peer_id"]: p["shard"] for p in session["peers"]} == {peers[0]: 0, peers[1]: 1, peers[2]: 1}
    figures = session["round_figures"]
    assert [f["round"] for f in figures] == [1, 2]
    first, second = figures
    assert (first["included"], first["left_out"], first["rejected"]) == ([peers[0], peers[1]], [], [])
    assert first["num_samples"] == 40
    assert first["loss"] == pytest.approx((10 * 0.5 + 30 * 0.1) / 40)
    assert (first["val_loss"], first["val_accuracy"]) == (0.3, 0.7)
    assert (second["included"], second["left_out"]) == ([peers[0], peers[2]], [peers[1]])
    assert second["rejected"] == [{"peer_id": peers[2], "reason": "NaN in fc.weight"}]
    assert second["val_accuracy"] == 0.85 and second["closed_at"]
    # what the peers applied, per round, and what the session asked for
    assert (second["aggregator"], second["selected"], second["update_bytes"]) == ("median", [peers[0]], 1234)
    assert (first["aggregator"], first["selected"], first["update_bytes"]) == ("mean", [], 0)  # defaults
    opts = session["round_options"]
    assert (opts["aggregator"]["name"], opts["compression"]["name"]) == ("median", "int8")
    assert (opts["outer"]["name"], opts["outer"]["lr"], opts["keep_local_optimizer"]) == ("momentum", 1.0, False)
    assert session["round_options_summary"] == "median · momentum(lr=1, beta1=0.9) · int8"
    sweep = await client.post("/sessions", json=session_body(dataset_id, 1, hyperparameters=[HP]), headers=alice)
    shown = (await client.get(f"/sessions/{sweep.json()['session_id']}", headers=alice)).json()
    assert shown["round_options"] is None and shown["round_options_summary"] is None  # no rounds, no options


async def test_metrics_are_per_peer_series(
    client: Client, alice: Headers, bob: Headers, dataset_id: str, online_peers: OnlinePeers, append: Append
) -> None:
    peers = await online_peers(2)
    sid = (await client.post("/sessions", json=session_body(dataset_id, hyperparameters=HP), headers=alice)).json()[
        "session_id"
    ]
    r = await client.get(f"/sessions/{sid}/metrics", headers=alice)
    assert r.json() == {"session_id": sid, "peers": []}
    hp = Hyperparameters(**HP)
    beats = [
        Heartbeat(
            session_id=sid,
            peer_id=p,
            epoch=e,
            epochs=2,
            loss=1.0 / e,
            accuracy=0.4 * e,
            val_loss=1.1 / e,
            val_accuracy=0.3 * e,
            samples_per_s=100.0 * e,
        )
        for e in (1, 2)
        for p in peers
    ]
    await append(SessionStarted(session_id=sid, assignments={p: hp for p in peers}), *beats)
    r = await client.get(f"/sessions/{sid}/metrics", headers=alice)
    assert r.status_code == 200
    body = r.json()
    assert [p["peer_id"] for p in body["peers"]] == peers
    for series in body["peers"]:
        assert [(pt["epoch"], pt["loss"], pt["val_accuracy"], pt["samples_per_s"]) for pt in series["points"]] == [
            (1, 1.0, 0.3, 100.0),
            (2, 0.5, 0.6, 200.0),
        ]
        assert all(pt["at"] and pt["accuracy"] and pt["val_loss"] for pt in series["points"])
    assert (await client.get(f"/sessions/{sid}/metrics", headers=bob)).status_code == 404


# ------------------------------------------------------------------ cancel


async def last_event(gateway: Gateway, sid: str) -> Event:
    msg = await gateway.js.get_last_msg(bus.EVENTS_STREAM, f"session.{sid}.events")
    assert msg.data is not None
    return decode_event(msg.data)


async def test_cancel_a_queued_session(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(2)
    sid = (await client.post("/sessions", json=session_body(dataset_id), headers=alice)).json()["session_id"]
    r = await client.post(f"/sessions/{sid}/cancel", headers=alice)
    assert (r.status_code, r.json()) == (202, {"session_id": sid, "status": "cancelled"})
    assert isinstance(await last_event(gateway, sid), SessionCancelled)
    assert (await client.get(f"/sessions/{sid}", headers=alice)).json()["status"] == "cancelled"
    r = await client.post(f"/sessions/{sid}/cancel", headers=alice)
    assert r.status_code == 409 and r.json()["detail"] == "the session is cancelled already"


async def test_cancel_an_ended_session_is_409_and_appends_nothing(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, append: Append, gateway: Gateway
) -> None:
    await online_peers(2)
    for ending in ("completed", "failed"):
        sid = (await client.post("/sessions", json=session_body(dataset_id), headers=alice)).json()["session_id"]
        await append(
            SessionCompleted(session_id=sid, best_peer_id="peer0", best_val_accuracy=0.5, model_uri="file:///m")
            if ending == "completed"
            else SessionFailed(session_id=sid, reason="no peer finished")
        )
        before = await last_event(gateway, sid)
        r = await client.post(f"/sessions/{sid}/cancel", headers=alice)
        assert (r.status_code, r.json()["detail"]) == (409, f"the session is {ending} already")
        assert await last_event(gateway, sid) == before


async def test_concurrent_cancels_append_one_event(
    client: Client, alice: Headers, dataset_id: str, online_peers: OnlinePeers, gateway: Gateway
) -> None:
    await online_peers(2)
    sid = (await client.post("/sessions", json=session_body(dataset_id), headers=alice)).json()["session_id"]
    answers = await asyncio.gather(*(client.post(f"/sessions/{sid}/cancel", headers=alice) for _ in range(4)))
    assert sorted(r.status_code for r in answers) == [202, 409, 409, 409]
    page = (await client.get(f"/sessions/{sid}/events", headers=alice)).json()
    assert [e["event"]["type"] for e in page["events"]] == ["SessionRequested", "SessionCancelled"]


# ------------------------------------------------------------------ event history


async def test_event_history_is_paginated_by_sequence(
    client: Client, alice: Headers, bob: Headers, dataset_id: str, online_peers: OnlinePeers, append: Append
) -> None:
    peers = await online_peers(2)
    sid = (await client.post("/sessions", json=session_body(dataset_id, hyperparameters=HP), headers=alice)).json()[
        "session_id"
    ]
    hp = Hyperparameters(**HP)
    beats = [
        Heartbeat(session_id=sid, peer_id=p, epoch=e, epochs=2, loss=0.5, accuracy=0.5, samples_per_s=1.0)
        for e in (1, 2)
        for p in peers
    ]
    # another session's events interleave in the stream, and must not show up
    other = (await client.post("/sessions", json=session_body(dataset_id, hyperparameters=HP), headers=alice)).json()[
        "session_id"
    ]
    await append(
        SessionStarted(session_id=sid, assignments={p: hp for p in peers}),
        SessionStarted(session_id=other, assignments={}),
        *beats,
        SessionFailed(session_id=sid, reason="test"),
    )
    seen: list[dict[str, Any]] = []
    after, pages = 0, 0
    while True:
        r = await client.get(f"/sessions/{sid}/events", params={"after": after, "limit": 3}, headers=alice)
        assert r.status_code == 200, r.text
        page = r.json()
        pages += 1
        seen += page["events"]
        after = page["next_after"]
        if not page["more"]:
            break
    assert pages == 3
    assert [e["event"]["type"] for e in seen] == ["SessionRequested", "SessionStarted"] + ["Heartbeat"] * 4 + [
        "SessionFailed"
    ]
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == 7 and after == seqs[-1]
    assert all(e["event"]["session_id"] == sid for e in seen)
    r = await client.get(f"/sessions/{sid}/events", params={"after": after}, headers=alice)
    assert r.json() == {"events": [], "next_after": after, "more": False}
    for params in ({"limit": 0}, {"limit": 5000}, {"after": -1}, {"after": "x"}):
        r = await client.get(f"/sessions/{sid}/events", params=params, headers=alice)
        assert r.status_code == 400, params
    assert (await client.get(f"/sessions/{sid}/events", headers=bob)).status_code == 404


async def test_a_model_that_changes_while_it_is_served_is_never_sent_whole(tmp_path: Path) -> None:
    """The route checks the sha256 before it streams; should the object be replaced in between,
    the stream holds back its last chunk until the bytes hash right, and fails instead."""
    from swarmtrain.common import blob
    from swarmtrain.gateway.sessions.routes import checked_chunks

    store = blob.FileStore(tmp_path)
    data = bytes(range(256)) * (5 * blob.CHUNK // 512)  # two and a half chunks
    ref = store.put_bytes("sessions/s/m.safetensors", data)
    assert b"".join([c async for c in checked_chunks(store, "sessions/s/m.safetensors", ref.sha256)]) == data
    sent: list[bytes] = []
    with pytest.raises(blob.IntegrityError, match="changed while it was served"):
        async for chunk in checked_chunks(store, "sessions/s/m.safetensors", "0" * 64):
            sent.append(chunk)
    assert 0 < len(b"".join(sent)) < len(data)
