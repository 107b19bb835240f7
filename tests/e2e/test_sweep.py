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
from safetensors.torch import load

from swarmtrain.common.events import decode_event
from swarmtrain.projector.projection import TABLES

from .conftest import Api, Stack, wait_for

HP = [
    {"epochs": 4, "batch_size": 32, "lr": 0.003},
    {"epochs": 4, "batch_size": 64, "lr": 0.01},
    {"epochs": 3, "batch_size": 32, "lr": 0.001},
]


def sweep(dataset_id: str, hps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "num_peers": len(hps),
        "strategy": "sweep",
        "model": {"kind": "mlp", "hidden": [64, 32]},
        "hyperparameters": hps,
        "validation_split": 0.2,
        "seed": 7,
    }


async def stored_events(nats_url: str, sid: str) -> list[bytes]:
    """The session's events as JetStream stores them."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.subscribe(f"session.{sid}.events", ordered_consumer=True)
    out: list[bytes] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            out.append(msg.data)
    except nats.errors.TimeoutError:
        pass
    await sub.unsubscribe()
    await nc.drain()
    return out


def test_sweep_on_three_peers_completes_with_results_and_a_model(stack: Stack, api: Api) -> None:
    tap = subprocess.Popen(
        [sys.executable, "-m", "swarmtrain.cli.main", "tap", "--nats", stack.nats_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "listening" in (tap.stderr.readline() if tap.stderr else "")
        api.wait_idle_peers(3)
        ds = api.upload()
        assert (ds["rows"], ds["features"], ds["classes"]) == (1797, 64, 10)
        resp = api.client.post("/sessions", json=sweep(ds["dataset_id"], HP))
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        done = api.wait_ended(sid)
        assert done["status"] == "completed", done
        assert len(done["peers"]) == 3
        for peer in done["peers"]:
            assert peer["status"] == "done"
            assert peer["epoch"] == peer["hyperparameters"]["epochs"]
            assert 0.5 < peer["val_accuracy"] <= 1.0  # digits: far above the 0.1 of chance
        best = max(done["peers"], key=lambda p: p["val_accuracy"])
        assert done["best_peer_id"] == best["peer_id"] and done["model_available"]

        model = api.client.get(f"/sessions/{sid}/model")
        assert model.status_code == 200
        tensors = load(model.content)  # safetensors: no pickle
        shapes = {tuple(t.shape) for t in tensors.values()}
        assert (64, 64) in shapes and (10, 32) in shapes, shapes

        # the peers are free again, and GET /peers says so
        wait_for(lambda: len([p for p in api.peers() if p["status"] == "online"]) >= 3, 30, "peers released")

        stored = asyncio.run(stored_events(stack.nats_url, sid))
        kinds = [decode_event(d).__class__.__name__ for d in stored]
        for kind in ("SessionRequested", "SessionStarted", "Heartbeat", "PeerDone", "SessionCompleted"):
            assert kind in kinds
        assert kinds.count("Heartbeat") == sum(h["epochs"] for h in HP)

        # the tap subscribed before the session began: read until it has shown as many of the
        # session's events as JetStream stored (the pytest timeout bounds a tap that falls short)
        tapped: list[str] = []
        assert tap.stdout is not None
        while len(tapped) < len(stored) and (line := tap.stdout.readline()):
            if json.loads(line).get("session_id") == sid:
                tapped.append(line.rstrip("\n"))
    finally:
        tap.send_signal(signal.SIGINT)
        tap.communicate(timeout=10)
    assert tapped == [d.decode() for d in stored]  # `swarmtrain tap` prints exactly what is on the wire


def test_peer_killed_mid_training_fails_alone_and_the_session_completes(stack: Stack, api: Api) -> None:
    victim = stack.start_peer("victim")
    peers = api.wait_idle_peers(4)
    victim_id = next(p["peer_id"] for p in peers if p["name"] == "victim")
    ds = api.upload()
    hps = [{"epochs": 25, "batch_size": 16, "lr": 0.003}] * 4  # long enough to be killed mid-run
    resp = api.client.post("/sessions", json=sweep(ds["dataset_id"], hps))
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    session = wait_for(lambda: (s := api.session(sid))["peers"] and s, 30, "the session to start")
    assert victim_id in {p["peer_id"] for p in session["peers"]}
    wait_for(
        lambda: next(p for p in api.session(sid)["peers"] if p["peer_id"] == victim_id)["epoch"] >= 1,
        60,
        "the victim's first epoch",
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = api.wait_ended(sid)
    assert done["status"] == "completed", done
    by_id = {p["peer_id"]: p for p in done["peers"]}
    assert by_id[victim_id]["status"] == "failed"
    assert sum(p["status"] == "done" for p in done["peers"]) >= 2
    assert done["best_peer_id"] != victim_id
    assert next(p for p in api.peers() if p["peer_id"] == victim_id)["status"] == "offline"


def test_projections_rebuild_to_identical_state(stack: Stack, api: Api) -> None:
    api.wait_idle_peers(1)
    ds = api.upload()
    resp = api.client.post("/sessions", json=sweep(ds["dataset_id"], [{"epochs": 2, "batch_size": 64, "lr": 0.01}]))
    assert api.wait_ended(resp.json()["session_id"])["status"] == "completed"
    dsn = stack.env["SWARMTRAIN_DATABASE_URL"]

    async def snapshot() -> dict[str, list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(dsn)
        try:
            return {t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY 1, 2")] for t in TABLES}
        finally:
            await conn.close()

    # settle: no event may land between the two snapshots except presence-driven peer updates
    before = asyncio.run(snapshot())
    result = subprocess.run(
        [sys.executable, "-m", "swarmtrain.cli.main", "projections", "rebuild"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "projections rebuilt" in result.stdout
    after = asyncio.run(snapshot())
    for table in TABLES:
        if table != "peers":
            assert after[table] == before[table], table
    assert [r[:4] for r in after["peers"]] == [r[:4] for r in before["peers"]]
