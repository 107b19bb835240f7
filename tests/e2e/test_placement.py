"""Placement and the queue end to end: `swarmtrain up` with one CPU peer, REST in, facts out; and
`swarmtrain peer --gpus` supervising one real peer process per (faked) GPU."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from swarmtrain.common import servers
from tests.factories import session_body
from tests.support import wait_for

from .conftest import Api, Stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, postgres_port: int) -> AsyncIterator[Stack]:
    name = f"place{uuid.uuid4().hex[:8]}"
    servers.create_database(postgres_port, name)
    st = Stack(tmp_path_factory.mktemp("stack"), servers.postgres_url(postgres_port, name), peers=1)
    try:
        await st.wait_healthy()
        yield st
    finally:
        assert not st.stop()


def session(dataset_id: str, num_peers: int = 1, **fields: Any) -> dict[str, Any]:
    hps = {"epochs": 1, "batch_size": 64, "lr": 0.003}
    return session_body(dataset_id, num_peers, hps, **{"model": {"kind": "mlp", "hidden": [16]}, **fields})


async def test_a_cuda_session_stays_queued_on_a_cpu_swarm_and_fails_after_its_timeout(api: Api) -> None:
    (cpu_peer,) = await api.wait_idle_peers(1)
    assert cpu_peer["specs"] is not None and cpu_peer["specs"]["gpus"] == []
    dataset = await api.upload()
    cuda = session(dataset["dataset_id"], requirements={"device": "cuda"})

    refused = await api.client.post("/sessions", json=cuda)  # without queue: today's 400
    assert refused.status_code == 400 and "not enough matching peers" in refused.json()["detail"]

    r = await api.client.post("/sessions", json={**cuda, "queue_timeout_s": 2})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    queued = await api.session(sid)
    assert (queued["status"], queued["queue_position"]) == ("queued", 1)

    ended = await api.wait_ended(sid, timeout=30)
    assert ended["status"] == "failed" and ended["peers"] == [] and ended["started_at"] is None
    assert ended["reason"].startswith("queue timeout: no 1 matching idle peers within 2 s"), ended["reason"]
    page = (await api.client.get(f"/sessions/{sid}/events")).json()
    assert [e["event"]["type"] for e in page["events"]] == ["SessionRequested", "SessionFailed"]
    assert (await api.peers())[0]["status"] == "online"  # the CPU peer was never taken


async def test_gpus_runs_one_supervised_peer_per_gpu_and_stops_them_together(stack: Stack, api: Api) -> None:
    # Two faked GPUs: each child is a real `swarmtrain peer --device cpu` (no CUDA here) with its own
    # name, id and CUDA_VISIBLE_DEVICES; the supervisor is the real `swarmtrain peer --gpus all`.
    env = {**stack.env, "SWARMTRAIN_FAKE_GPUS": "2", "SWARMTRAIN_STATE_DIR": str(stack.data_dir / "gpus")}
    argv = ["peer", "--gpus", "all", "--name", "box", "--label", "rack=r1", "--nats", stack.nats_url]
    with stack.launcher.log("box").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarmtrain.cli.main", *argv, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:

        async def both_online() -> dict[str, dict[str, Any]] | None:
            box = {p["name"]: p for p in await api.online() if p["name"].startswith("box-gpu")}
            return box if set(box) == {"box-gpu0", "box-gpu1"} else None

        box = await wait_for(both_online, "box-gpu0 and box-gpu1 online", timeout=60, interval=0.2)
        assert len({p["peer_id"] for p in box.values()}) == 2
        assert all(p["specs"]["labels"] == {"rack": "r1"} for p in box.values())

        # the label places a session on exactly these two peers
        dataset = await api.upload()
        body = session(dataset["dataset_id"], 2, requirements={"labels": {"rack": "r1"}})
        r = await api.client.post("/sessions", json=body)
        assert r.status_code == 201, r.text
        done = await api.wait_ended(r.json()["session_id"], timeout=90)
        assert done["status"] == "completed", done
        assert {p["peer_id"] for p in done["peers"]} == {p["peer_id"] for p in box.values()}
        assert "matching (device=any, rack=r1)" in done["placement"]

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0

        async def both_offline() -> bool:
            return all(p["status"] == "offline" for p in await api.peers() if p["name"].startswith("box-gpu"))

        await wait_for(both_offline, "the box peers offline", timeout=30, interval=0.2)
    finally:
        if proc.returncode is None:  # SIGTERM first: the supervisor stops its children
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
