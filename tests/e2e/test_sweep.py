"""The spine end to end: `swarmtrain up` as processes, REST in, events out, a model back."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import asyncpg
import nats
from nats.js.api import AckPolicy
from safetensors.torch import load

from swarmtrain.common import bus, subjects
from swarmtrain.projector.projection import TABLES
from tests.factories import session_body
from tests.support import wait_for

from .conftest import Api, Stack, cli

HP = [
    {"epochs": 4, "batch_size": 32, "lr": 0.003},
    {"epochs": 4, "batch_size": 64, "lr": 0.01},
    {"epochs": 3, "batch_size": 32, "lr": 0.001},
]


def sweep(dataset_id: str, hps: list[dict[str, Any]]) -> dict[str, Any]:
    return session_body(
        dataset_id,
        len(hps),
        hps,
        strategy="sweep",
        model={"kind": "mlp", "hidden": [64, 32]},
        validation_split=0.2,
        seed=7,
    )


async def stored_events(nats_url: str, sid: str) -> list[bytes]:
    """The session's events as JetStream stores them (everything stored when asked)."""
    return await stored_messages(nats_url, subjects.session_events(sid))


async def stored_messages(nats_url: str, subject: str) -> list[bytes]:
    """The events stream's messages on ``subject`` (everything stored when asked)."""
    nc = await nats.connect(nats_url)
    sub = await bus.pull_consumer(nc.jetstream(), bus.EVENTS_STREAM, ack=AckPolicy.NONE, filter_subject=subject)
    out: list[bytes] = []
    while batch := await bus.fetch(sub, lambda data: data, batch=1024, timeout=0.5):
        out += [msg.data for msg, _ in batch]
        if batch[-1][0].metadata.num_pending == 0:
            break
    await sub.unsubscribe()
    await nc.drain()
    return out


async def test_sweep_on_three_peers_completes_with_results_and_a_model(stack: Stack, api: Api) -> None:
    tap = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarmtrain.cli.main",
        "tap",
        "--nats",
        stack.nats_url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tap.stdout is not None and tap.stderr is not None
    try:
        assert b"listening" in await asyncio.wait_for(tap.stderr.readline(), 30)
        await api.wait_idle_peers(3)
        ds = await api.upload()
        assert (ds["rows"], ds["features"], ds["classes"]) == (1797, 64, 10)
        resp = await api.client.post("/sessions", json=sweep(ds["dataset_id"], HP))
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        done = await api.wait_ended(sid)
        assert done["status"] == "completed", done
        assert len(done["peers"]) == 3
        for peer in done["peers"]:
            assert peer["status"] == "done"
            assert peer["epoch"] == peer["hyperparameters"]["epochs"]
            assert 0.5 < peer["val_accuracy"] <= 1.0  # digits: far above the 0.1 of chance
        best = max(done["peers"], key=lambda p: p["val_accuracy"])
        assert done["best_peer_id"] == best["peer_id"] and done["model_available"]

        model = await api.client.get(f"/sessions/{sid}/model")
        assert model.status_code == 200
        tensors = load(model.content)  # safetensors: no pickle
        shapes = {tuple(t.shape) for t in tensors.values()}
        assert (64, 64) in shapes and (10, 32) in shapes, shapes

        # the peers are free again, and GET /peers says so
        await api.wait_idle_peers(3, timeout=30)

        stored = await stored_events(stack.nats_url, sid)
        kinds = [json.loads(d)["type"] for d in stored]
        for kind in ("SessionRequested", "SessionStarted", "Heartbeat", "PeerDone", "SessionCompleted"):
            assert kind in kinds
        assert kinds.count("Heartbeat") == sum(h["epochs"] for h in HP)

        # the tap subscribed before the session began: read until it has shown as many of the
        # session's events as JetStream stored (the pytest timeout bounds a tap that falls short)
        tapped: list[bytes] = []
        while len(tapped) < len(stored) and (line := await tap.stdout.readline()):
            if json.loads(line).get("session_id") == sid:
                tapped.append(line.rstrip(b"\n"))
    finally:
        tap.send_signal(signal.SIGINT)
        await asyncio.wait_for(tap.communicate(), 10)
    assert tapped == stored  # `swarmtrain tap` prints exactly what is on the wire


async def test_back_to_back_sessions_on_every_peer_need_no_queue(stack: Stack, api: Api) -> None:
    """A session shown completed has its peers idle already (they are released before it is
    completed), so a script that runs sessions needing every peer one after the other never
    meets 'not enough online peers'."""
    dataset = await api.upload()
    await api.wait_idle_peers(3)
    body = sweep(dataset["dataset_id"], [{"epochs": 1, "batch_size": 64, "lr": 0.01}] * 3)
    for _ in range(2):
        resp = await api.client.post("/sessions", json=body)  # no "queue": a 400 if a peer were still held
        assert resp.status_code == 201, resp.text
        ended = await api.wait_ended(resp.json()["session_id"])
        assert ended["status"] == "completed", ended
        idle = await api.online()  # read right after the session showed completed
        assert len(idle) >= 3, idle


async def test_peer_killed_mid_training_fails_alone_and_the_session_completes(stack: Stack, api: Api) -> None:
    victim = stack.start_peer("victim")
    peers = await api.wait_idle_peers(4)
    victim_id = next(p["peer_id"] for p in peers if p["name"] == "victim")
    ds = await api.upload()
    hps = [{"epochs": 25, "batch_size": 16, "lr": 0.003}] * 4  # long enough to be killed mid-run
    resp = await api.client.post("/sessions", json=sweep(ds["dataset_id"], hps))
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    session = await api.wait_started(sid)
    assert victim_id in {p["peer_id"] for p in session["peers"]}

    async def victim_trained_an_epoch() -> bool:
        return any(p["peer_id"] == victim_id and p["epoch"] >= 1 for p in (await api.session(sid))["peers"])

    await wait_for(victim_trained_an_epoch, "the victim's first epoch", timeout=60, interval=0.2)
    victim.kill()
    await asyncio.to_thread(victim.wait)
    done = await api.wait_ended(sid)
    assert done["status"] == "completed", done
    by_id = {p["peer_id"]: p for p in done["peers"]}
    assert by_id[victim_id]["status"] == "failed"
    assert sum(p["status"] == "done" for p in done["peers"]) >= 2
    assert done["best_peer_id"] != victim_id
    assert next(p for p in await api.peers() if p["peer_id"] == victim_id)["status"] == "offline"


async def test_a_diverging_run_fails_with_its_reason_and_the_sweep_goes_on(stack: Stack, api: Api) -> None:
    await api.wait_idle_peers(2)
    ds = await api.upload()
    hps = [{"epochs": 3, "batch_size": 64, "lr": 1e30}, {"epochs": 2, "batch_size": 64, "lr": 0.01}]
    resp = await api.client.post("/sessions", json=sweep(ds["dataset_id"], hps))
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    done = await api.wait_ended(sid)
    assert done["status"] == "completed", done
    by_lr = {p["hyperparameters"]["lr"]: p for p in done["peers"]}
    assert by_lr[1e30]["status"] == "failed"
    assert by_lr[1e30]["reason"].startswith("diverged: non-finite loss at epoch "), by_lr[1e30]
    assert by_lr[0.01]["status"] == "done" and done["best_peer_id"] == by_lr[0.01]["peer_id"]
    # no report carried NaN: every stored fact decodes, and the failed run's figures are all finite
    stored = [json.loads(d) for d in await stored_events(stack.nats_url, sid)]
    assert all(e["loss"] is not None for e in stored if e["type"] == "Heartbeat")


async def test_projections_rebuild_to_identical_state(stack: Stack, api: Api) -> None:
    await api.wait_idle_peers(1)
    ds = await api.upload()
    hps = [{"epochs": 2, "batch_size": 64, "lr": 0.01}]
    resp = await api.client.post("/sessions", json=sweep(ds["dataset_id"], hps))
    assert (await api.wait_ended(resp.json()["session_id"]))["status"] == "completed"
    dsn = stack.env["SWARMTRAIN_DATABASE_URL"]

    async def snapshot() -> dict[str, list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(dsn)
        try:
            return {t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY 1, 2")] for t in TABLES}
        finally:
            await conn.close()

    # settle: no event may land between the two snapshots except presence-driven peer updates
    before = await snapshot()
    rc, out, err = await cli("projections", "rebuild", env=stack.env)
    assert rc == 0, err
    assert "projections rebuilt" in out
    after = await snapshot()
    for table in TABLES:
        if table != "peers":
            assert after[table] == before[table], table
    assert [r[:4] for r in after["peers"]] == [r[:4] for r in before["peers"]]
