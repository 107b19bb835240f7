"""Write ``tests/history/main-<rev>.jsonl`` and ``.readmodels.json``: a log made by running the stack.

Run once, on the commit the log is meant to stand for (``python -m tests.history.capture <rev>``): it
starts ``swarmtrain up`` with 3 peers in a temporary folder and drives sessions that produce every
kind of stored message (a sweep with a diverging run, fedavg rounds with round options, a fork, a
poisoned fedavg with rejected updates, a forged report, a killed peer, a cancel, a queue timeout),
then dumps the three streams (subject, sequence, payload) and the projector's tables.
``test_history.py`` decodes this log with the code of today and rebuilds the same read models."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy

from swarmtrain.common import bus, servers
from swarmtrain.common.events import Heartbeat
from swarmtrain.common.settings import Settings
from tests.e2e.conftest import Api, Stack
from tests.e2e.test_fedavg import Poisoner, fedavg, first_heartbeat
from tests.history.test_history import snapshot

HERE = Path(__file__).resolve().parent


async def dump_stream(nats_url: str, stream: str) -> list[dict[str, Any]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await bus.pull_consumer(js, stream, ack=AckPolicy.NONE)
    out: list[dict[str, Any]] = []
    while batch := await bus.fetch(sub, lambda data: data, batch=1024, timeout=1.0):
        for msg, _ in batch:
            out.append(
                {
                    "stream": stream,
                    "seq": msg.metadata.sequence.stream,
                    "subject": msg.subject,
                    "data": json.loads(msg.data),
                }
            )
        if batch[-1][0].metadata.num_pending == 0:
            break
    await sub.unsubscribe()
    await nc.drain()
    return out


async def post(api: Api, path: str, body: dict[str, Any]) -> str:
    resp = await api.client.post(path, json=body)
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["session_id"]
    return sid


async def scenario(stack: Stack, api: Api) -> None:
    await api.wait_idle_peers(3)
    ds = (await api.upload())["dataset_id"]
    mlp = {"kind": "mlp", "hidden": [32]}
    one = {"epochs": 1, "batch_size": 64, "lr": 0.01}

    # a sweep: one run diverges (PeerFailed), the other completes (PeerDone, SessionCompleted)
    sweep = {
        "dataset_id": ds,
        "num_peers": 2,
        "strategy": "sweep",
        "model": mlp,
        "seed": 7,
        "hyperparameters": [{"epochs": 2, "batch_size": 64, "lr": 1e30}, one],
    }
    sid = await post(api, "/sessions", sweep)
    assert (await api.wait_ended(sid))["status"] == "completed"

    # fedavg rounds with non-default round options (every flat field of the request filled)
    body = fedavg(
        ds,
        3,
        rounds=2,
        local=one,
        model=mlp,
        max_update_norm=1000.0,
        aggregator={"name": "median"},
        outer={"name": "nesterov", "lr": 0.7},
        compression={"name": "fp16"},
        keep_local_optimizer=True,
        on_peer_failure="continue",
    )
    await api.wait_idle_peers(3)
    parent = await post(api, "/sessions", body)
    assert (await api.wait_ended(parent))["status"] == "completed"

    # a fork at round 2 without one peer (InitModelPrepared), a sweep from the parent's model
    await api.wait_idle_peers(3)
    done = await api.session(parent)
    excluded = sorted(p["peer_id"] for p in done["peers"])[0]
    fork = await post(api, f"/sessions/{parent}/fork", {"round": 2, "exclude_peers": [excluded], "num_peers": 2})
    assert (await api.wait_ended(fork))["status"] == "completed"
    await api.wait_idle_peers(3)
    tuned = await post(
        api,
        "/sessions",
        {"dataset_id": ds, "num_peers": 1, "model": mlp, "hyperparameters": one, "init_from": {"session_id": parent}},
    )
    assert (await api.wait_ended(tuned))["status"] == "completed"

    # poisoned updates (UpdateRejected) and a forged report (ReportRejected)
    await api.wait_idle_peers(3)
    poisoner = Poisoner(Settings(nats_url=stack.nats_url))
    poisoner.start()
    try:
        await poisoner.online(api)
        poisoned = await post(api, "/sessions", fedavg(ds, 4, rounds=2, local=one, model=mlp))
        assert (await api.wait_ended(poisoned))["status"] == "completed"
    finally:
        poisoner.stop.set()
        await asyncio.to_thread(poisoner.join, 30)
    assert poisoner.error is None, poisoner.error
    nc = await nats.connect(stack.nats_url)
    forged = Heartbeat(
        session_id=sid, peer_id=poisoner.peer_id, epoch=1, epochs=1, loss=0.1, accuracy=0.9, samples_per_s=1.0
    )
    await bus.report(nc.jetstream(), forged)
    await nc.drain()

    # a killed participant's shard goes to the idle spare (ShardReassigned, PeerWentOffline)
    victim_proc = stack.start_peer("victim")
    peers = await api.wait_idle_peers(4)
    names = {p["peer_id"]: p["name"] for p in peers}
    moved = await post(api, "/sessions", fedavg(ds, 3, rounds=4, model=mlp))
    session = await api.wait_started(moved)
    participants = sorted(p["peer_id"] for p in session["peers"])
    victim = next((p for p in participants if names[p] == "victim"), None)
    if victim is not None:
        await first_heartbeat(stack, moved, victim)
        victim_proc.kill()
    assert (await api.wait_ended(moved))["status"] == "completed"
    victim_proc.kill()

    # a cancel
    await api.wait_idle_peers(3)
    long = await post(
        api,
        "/sessions",
        {
            "dataset_id": ds,
            "num_peers": 1,
            "model": mlp,
            "hyperparameters": {"epochs": 200, "batch_size": 16, "lr": 0.003},
        },
    )
    await api.wait_started(long)
    resp = await api.client.post(f"/sessions/{long}/cancel")
    assert resp.status_code in (200, 202, 204), resp.text
    assert (await api.wait_ended(long))["status"] == "cancelled"

    # a queue timeout (SessionFailed)
    await api.wait_idle_peers(3)
    failed = await post(
        api,
        "/sessions",
        {
            "dataset_id": ds,
            "num_peers": 1,
            "model": mlp,
            "hyperparameters": one,
            "requirements": {"device": "cuda"},
            "queue_timeout_s": 1,
        },
    )
    assert (await api.wait_ended(failed, timeout=30))["status"] == "failed"
    await asyncio.sleep(3)  # let the projector and scheduler settle on the last facts


async def main(rev: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = servers.free_port()
        pg = servers.start_postgres(root / "pg", port, durable=False)
        try:
            name = f"cap{uuid.uuid4().hex[:8]}"
            servers.create_database(port, name)
            dsn = servers.postgres_url(port, name)
            (root / "stack").mkdir()
            stack = Stack(root / "stack", dsn, peers=3)
            api = Api(stack.url)
            try:
                await stack.wait_healthy()
                await api.signup()
                await scenario(stack, api)
                messages = []
                for stream in (bus.EVENTS_STREAM, bus.COMMANDS_STREAM, bus.REPORTS_STREAM):
                    messages += await dump_stream(stack.nats_url, stream)
                models = await snapshot(dsn)
            finally:
                await api.client.aclose()
                stack.stop()
        finally:
            servers.stop(pg, signal.SIGINT)
    with (HERE / f"main-{rev}.jsonl").open("w") as out:
        for m in messages:
            out.write(json.dumps(m, sort_keys=True) + "\n")
    (HERE / f"main-{rev}.readmodels.json").write_text(json.dumps(models, indent=0, sort_keys=True) + "\n")
    print(len(messages), "messages;", {t: len(r) if isinstance(r, list) else r for t, r in models.items()})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
