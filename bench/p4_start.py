"""P4 start and end latency: ``POST /sessions`` until every assigned peer has received its
``Train``, step by step; and the end: the last ``PeerDone`` until ``SessionCompleted`` and every
peer idle again.

Real nats-server, PostgreSQL, projector, scheduler and gateway processes; light fake peers
(``bench._fakepeers``: one durable command consumer each, fetched and acked as the real peer
does; they report an instant ``PeerDone`` with a real model file, so the session completes once
the scheduler has checked the winner, and the peers come free again).

A (platform): wait until the read models show enough idle peers, then time ``POST /sessions`` (a
sweep on ``PEERS_PER_SESSION`` peers) to the last of its peers' ``Train`` arrivals. A core
subscription on the event subjects times each step on the way, as the bus shows it: the
gateway's append of ``SessionRequested``, the POST's answer, the scheduler's first and last
``PeerLocked`` (its read of the log, placement, the locks' compare-and-sets), ``SessionStarted``,
each ``Train``. Then the end: the last ``PeerDone`` fact, ``ModelEvaluated`` (the winner
checked), ``SessionCompleted``, the last ``PeerReleased``.
B (floor): the same chain with no service logic in between, from this process: one HTTP round trip
to the gateway (``/healthz``), the appends the scheduler makes one after the other (the request, a
lock per peer, the start; to a scratch stream) and one ``Train`` per peer to the same fake peers,
until the last arrives. A and B alternate, ``SESSIONS`` of each.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

import httpx
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from bench._common import (
    ROOT,
    Report,
    Stack,
    cli_output,
    median,
    percentile,
    quick,
    signup,
    upload_dataset,
    wait_idle_peers,
)
from bench._fakepeers import FakeSwarm, model_file
from swarmtrain.common import blob, bus
from swarmtrain.common.events import (
    Hyperparameters,
    ModelEvaluated,
    PeerDone,
    PeerLocked,
    PeerReleased,
    SessionCompleted,
    SessionRequested,
    SessionStarted,
    Train,
    decode_event,
    new_id,
)
from swarmtrain.common.models import MlpSpec

SESSIONS, PEERS, PEERS_PER_SESSION = (5, 4, 2) if quick() else (50, 4, 2)
SCRATCH = "BENCHFLOOR"


class Marks:
    """When each event of a session was seen on the bus (``perf_counter``): the first of a kind,
    and for locks, releases and ``PeerDone`` also the last."""

    def __init__(self) -> None:
        self.first: dict[str, dict[str, float]] = defaultdict(dict)
        self.last: dict[str, dict[str, float]] = defaultdict(dict)

    async def on_event(self, msg: Msg) -> None:
        now = time.perf_counter()
        event = decode_event(msg.data)
        match event:
            case SessionRequested() | SessionStarted() | SessionCompleted() | ModelEvaluated():
                kind = type(event).__name__
            case PeerLocked() | PeerReleased() | PeerDone():
                kind = type(event).__name__
            case _:
                return
        sid = event.session_id
        self.first[sid].setdefault(kind, now)
        self.last[sid][kind] = now

    async def wait(self, sid: str, kind: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while kind not in self.first.get(sid, {}):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {kind} for session {sid} in {timeout:.0f}s")
            await asyncio.sleep(0.001)
        return self.first[sid][kind]


async def floor_once(client: httpx.AsyncClient, js: JetStreamContext, swarm: FakeSwarm, peers: list[str]) -> float:
    sid = new_id()
    swarm.no_reply.add(sid)
    t0 = time.perf_counter()
    (await client.get("/healthz")).raise_for_status()
    for i in range(len(peers) + 2):
        await js.publish(f"bench.{sid}.{i}", b"{}", headers={"Nats-Msg-Id": f"{sid}.{i}"}, stream=SCRATCH)
    hp = Hyperparameters(epochs=1, batch_size=32, lr=0.01)
    for peer_id in peers:
        train = Train(
            peer_id=peer_id, session_id=sid, dataset_uri="file:///d.csv", dataset_sha256="0" * 64,
            label_column="label", model=MlpSpec(), hyperparameters=hp, validation_split=0.2, seed=0,
            output_uri="file:///m",
        )  # fmt: skip
        await bus.send(js, train)
    arrivals = await swarm.wait_trains(sid, len(peers))
    return max(arrivals) - t0


STEPS = (
    ("POST -> SessionRequested appended", "post", "SessionRequested"),
    ("SessionRequested -> first PeerLocked (scheduler read + placement + CAS)", "SessionRequested", "PeerLocked"),
    ("first -> last PeerLocked", "PeerLocked", "PeerLocked.last"),
    ("last PeerLocked -> SessionStarted", "PeerLocked.last", "SessionStarted"),
    ("SessionStarted -> first Train received", "SessionStarted", "train.first"),
    ("first -> last Train received", "train.first", "train.last"),
    ("POST -> answer (201)", "post", "answer"),
)
END_STEPS = (
    ("last PeerDone -> ModelEvaluated (winner checked)", "PeerDone.last", "ModelEvaluated"),
    ("ModelEvaluated -> SessionCompleted", "ModelEvaluated", "SessionCompleted"),
    ("last PeerDone -> last PeerReleased", "PeerDone.last", "PeerReleased.last"),
)


def scheduler_steps(path: Path, sessions: set[str]) -> dict[str, list[float]]:
    """The scheduler's own timing of each start (its ``session started`` log line, ms): from the
    loop waking to the decision, the decision, the locks' compare-and-sets, ``SessionStarted``, the
    ``Train`` sends; for the timed sessions only."""
    out: dict[str, list[float]] = defaultdict(list)
    for line in path.read_text(errors="replace").splitlines():
        if '"session started"' not in line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("session_id") not in sessions:
            continue
        for step, ms in (entry.get("ms") or {}).items():
            if isinstance(ms, int | float):
                out[step].append(float(ms))
    return out


def p50_p99(seconds: list[float]) -> tuple[float, float]:
    return round(median(seconds) * 1000, 2), round(percentile(seconds, 99) * 1000, 2)


async def main() -> Report:
    report = Report("P4 start")
    with Stack("p4") as st:
        st.start("projector")
        st.start("scheduler")
        st.start("gateway")
        st.wait_gateway()
        st.wait_log("scheduler", "state rebuilt")
        nc = await nats.connect(st.nats_url)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        await js.add_stream(api.StreamConfig(name=SCRATCH, subjects=["bench.>"], storage=api.StorageType.FILE))
        marks = Marks()
        subs = [await nc.subscribe(s, cb=marks.on_event) for s in ("session.*.events", "peer.*.events")]
        dataset = ROOT / "examples" / "digits.csv"
        swarm = FakeSwarm(nc, PEERS, mode="durable", store=blob.FileStore(st.blob_dir), model=model_file(dataset))
        await swarm.start()
        platform: list[float] = []
        floor: list[float] = []
        steps: dict[str, list[float]] = defaultdict(list)
        ends: list[float] = []
        sessions: list[str] = []
        end_steps: dict[str, list[float]] = defaultdict(list)
        async with httpx.AsyncClient(base_url=st.gateway_url, timeout=30) as client:
            await signup(client)
            dataset_id = await upload_dataset(client, dataset)
            body = {
                "dataset_id": dataset_id,
                "num_peers": PEERS_PER_SESSION,
                "hyperparameters": {"epochs": 1, "batch_size": 32, "lr": 0.01},
            }
            for i in range(SESSIONS + 1):
                await wait_idle_peers(st.database_url, PEERS_PER_SESSION)
                t0 = time.perf_counter()
                resp = await client.post("/sessions", json=body)
                answered = time.perf_counter()
                if resp.status_code != 201:
                    raise RuntimeError(f"POST /sessions: {resp.status_code} {resp.text[:300]}")
                sid = resp.json()["session_id"]
                arrivals = await swarm.wait_trains(sid, PEERS_PER_SESSION)
                await marks.wait(sid, "SessionCompleted")
                await asyncio.sleep(0.05)  # the releases' marks
                floor_s = await floor_once(client, js, swarm, swarm.peer_ids[:PEERS_PER_SESSION])
                if not i:  # the first pair warms both paths up
                    continue
                platform.append(max(arrivals) - t0)
                sessions.append(sid)
                floor.append(floor_s)
                at = {f"{k}.last": v for k, v in marks.last[sid].items()} | marks.first[sid]
                at |= {"post": t0, "answer": answered, "train.first": min(arrivals), "train.last": max(arrivals)}
                for name, a, b in STEPS:
                    if a in at and b in at:
                        steps[name].append(at[b] - at[a])
                for name, a, b in END_STEPS:
                    if a in at and b in at:
                        end_steps[name].append(at[b] - at[a])
                if "PeerReleased.last" in at:
                    ends.append(max(at["PeerReleased.last"], at["SessionCompleted"]) - at["PeerDone.last"])
        await swarm.close()
        for sub in subs:
            await sub.unsubscribe()
        inside = scheduler_steps(st.logs / "scheduler.log", set(sessions))
        rss = st.rss()
        await nc.drain()
    ms = 1000.0
    ref = percentile(floor, 50) * ms
    row = report.add(
        "p50 POST -> all Train received",
        percentile(platform, 50) * ms,
        "ms",
        reference=ref,
        reference_name="floor p50: HTTP RTT + appends + sends",
        target="p50 <= 2x floor",
    )
    row.met = row.value <= 2 * ref
    row = report.add(
        "p99 POST -> all Train received",
        percentile(platform, 99) * ms,
        "ms",
        reference=percentile(floor, 99) * ms,
        reference_name="floor p99",
        target="p99 <= 50 ms",
    )
    row.met = row.value <= 50
    row = report.add(
        "p99 last PeerDone -> completed, peers released",
        percentile(ends, 99) * ms,
        "ms",
        reference=percentile(ends, 50) * ms,
        reference_name="its own p50",
        target="p99 <= 50 ms",
        note="includes the scheduler's evaluation of the winning model",
    )
    row.met = row.value <= 50
    report.extra = {
        "sessions": len(platform),
        "peers_per_session": PEERS_PER_SESSION,
        "start_steps_ms_p50_p99": {
            k: (round(median(v) * ms, 2), round(percentile(v, 99) * ms, 2)) for k, v in steps.items()
        },
        "scheduler_start_steps_ms_p50_p99": {
            k: (round(median(v), 2), round(percentile(v, 99), 2)) for k, v in inside.items() if v
        },
        "end_steps_ms_p50_p99": {
            k: (round(median(v) * ms, 2), round(percentile(v, 99) * ms, 2)) for k, v in end_steps.items()
        },
        "platform_ms": sorted(round(x * ms, 1) for x in platform),
        "floor_ms": sorted(round(x * ms, 1) for x in floor),
        "end_ms": sorted(round(x * ms, 1) for x in ends),
        "rss_mib": rss,
    }
    return report


if __name__ == "__main__":
    asyncio.run(main()).write(cli_output())
