"""Long runs survive (issue 22), end to end with real servers: a sweep run with ``checkpoint_every``
saves its checkpoints through signed URLs, the log records each (``CheckpointSaved``); its peer is
killed mid-run, an idle peer takes the run over (``ShardReassigned``) with a ``Train`` naming the
last checkpoint, and the run goes on after that epoch: no epoch trained again, none missing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.js.api import AckPolicy

from swarmtrain.common import bus, events, servers, subjects
from tests.factories import session_body
from tests.support import wait_for

from .conftest import Api, Stack
from .test_sweep import stored_events, stored_messages

EPOCHS, EVERY = 10, 2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, postgres_port: int) -> AsyncIterator[Stack]:
    """A stack of its own without peers of its own: the test's two are the one it kills and the spare."""
    name = f"e2e{uuid.uuid4().hex[:8]}"
    servers.create_database(postgres_port, name)
    st = Stack(
        tmp_path_factory.mktemp("stack"),
        servers.postgres_url(postgres_port, name),
        peers=0,
    )
    try:
        await st.wait_healthy()
        yield st
    finally:
        left = st.stop()
        assert not left, f"swarmtrain up left processes behind: {left}"


async def commands(nats_url: str, peer_id: str) -> list[events.Train]:
    """The ``Train`` commands stored for ``peer_id`` (every send and re-send)."""
    nc = await nats.connect(nats_url)
    sub = await bus.pull_consumer(
        nc.jetstream(), bus.COMMANDS_STREAM, ack=AckPolicy.NONE, filter_subject=subjects.peer_command(peer_id)
    )
    out: list[events.Train] = []
    while batch := await bus.fetch(sub, events.decode_command, batch=256, timeout=0.5):
        out += [c for _, c in batch if isinstance(c, events.Train)]
        if batch[-1][0].metadata.num_pending == 0:
            break
    await sub.unsubscribe()
    await nc.drain()
    return out


def of_type(stored: list[bytes], kind: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, stored) if e["type"] == kind]


@pytest.mark.timeout(300)  # its own stack's start, under a loaded CI machine, besides its waits
async def test_a_killed_peers_run_is_taken_over_from_its_last_checkpoint(stack: Stack, api: Api) -> None:
    procs = {name: stack.start_peer(name) for name in ("one", "two")}
    names = {p["peer_id"]: p["name"] for p in await api.wait_idle_peers(2)}
    ds = await api.upload()
    hps = [{"epochs": EPOCHS, "batch_size": 128, "lr": 0.01, "checkpoint_every": EVERY}]
    body = session_body(ds["dataset_id"], 1, hps, strategy="sweep", model={"kind": "mlp", "hidden": [64, 32]}, seed=7)
    resp = await api.client.post("/sessions", json=body)
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    (victim_id,) = [p["peer_id"] for p in (await api.wait_started(sid))["peers"]]
    victim = procs[names[victim_id]]  # the other one stays idle: it may take the run over

    async def two_checkpoints() -> list[dict[str, Any]] | None:
        saved = of_type(await stored_events(stack.nats_url, sid), "CheckpointSaved")
        return saved if len(saved) >= 2 else None

    await wait_for(two_checkpoints, "two checkpoints in the log", timeout=40, interval=0.2)
    victim.kill()  # SIGKILL: no report, no goodbye
    await asyncio.to_thread(victim.wait)

    done = await api.wait_ended(sid, timeout=120)
    assert done["status"] == "completed", done
    runs = {p["peer_id"]: p for p in done["peers"]}
    (rescuer_id,) = set(runs) - {victim_id}
    assert runs[victim_id]["status"] == "failed" and runs[rescuer_id]["status"] == "done"
    assert runs[rescuer_id]["epoch"] == EPOCHS and done["best_peer_id"] == rescuer_id

    stored = await stored_events(stack.nats_url, sid)
    (moved,) = of_type(stored, "ShardReassigned")
    assert (moved["from_peer_id"], moved["to_peer_id"]) == (victim_id, rescuer_id)
    saved = of_type(stored, "CheckpointSaved")
    mine = [c for c in saved if c["peer_id"] == victim_id]
    theirs = [c for c in saved if c["peer_id"] == rescuer_id]
    assert [c["epoch"] for c in mine] == list(range(EVERY, EVERY * len(mine) + 1, EVERY))
    assert all(c["uri"].endswith(f"/sessions/{sid}/checkpoints/{victim_id}/{c['epoch']}.safetensors") for c in mine)

    # the rescuer's Train names the victim's last checkpoint, with a signed GET of it
    (train,) = [t for t in await commands(stack.nats_url, rescuer_id) if t.session_id == sid]
    last = mine[-1]
    assert (train.resume_epoch, train.resume_uri, train.resume_sha256) == (last["epoch"], last["uri"], last["sha256"])
    assert train.resume_url and min(train.checkpoint_urls) == last["epoch"] + EVERY
    k = train.resume_epoch
    assert [c["epoch"] for c in theirs] == list(range(k + EVERY, EPOCHS, EVERY))  # its own, after k

    # it went on after that epoch (its own log says so), not from epoch 1
    log = stack.launcher.log(names[rescuer_id]).read_text()
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    assert [x["epoch"] for x in lines if x.get("event") == "resuming from a checkpoint"] == [k]

    # the session's curve: the victim's epochs to its death, the rescuer's from k + 1 to the last
    resp = await api.client.get(f"/sessions/{sid}/metrics")
    assert resp.status_code == 200, resp.text
    series = {s["peer_id"]: s["points"] for s in resp.json()["peers"]}
    before, after = series[victim_id], series[rescuer_id]
    assert [p["epoch"] for p in before] == list(range(1, len(before) + 1)) and len(before) >= k
    assert [p["epoch"] for p in after] == list(range(k + 1, EPOCHS + 1))  # no epoch again, none missing
    if len(before) > k:  # the victim trained epoch k + 1 too: the rescuer's is the same on a CPU
        assert after[0]["loss"] == pytest.approx(before[k]["loss"], rel=1e-4)
    assert after[-1]["loss"] < before[0]["loss"]
    reports = [json.loads(e) for e in await stored_peer_events(stack.nats_url, rescuer_id)]
    assert not [e for e in reports if e["type"] == "ReportRejected"], reports


async def stored_peer_events(nats_url: str, peer_id: str) -> list[bytes]:
    return await stored_messages(nats_url, subjects.peer_events(peer_id))
