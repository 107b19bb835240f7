"""P7 scale: 1,000 light peers and 100 concurrent sessions against the real services.

Real nats-server, PostgreSQL, projector, scheduler and gateway processes. The simulator (this
process) runs 1,000 fake peers (``bench._fakepeers``, core command subscription): presence beats
once a second each, and 'training' that answers ``Train`` after 1 to 3 s with one ``Heartbeat`` and
``PeerDone`` (reports, checked by the scheduler; a real model file, so the winner's evaluation
passes). A wave is 100 sweep sessions of 10 peers each, requested through ``POST /sessions``
(10 requests in flight), so every peer is busy at once.

Scheduler decision latency, seen on the bus by the simulator: ``SessionRequested`` -> the first
``PeerLocked`` for it (start decisions), and the last ``PeerDone`` -> ``SessionCompleted`` (completion
decisions). Gateway latency: ``GET /sessions/{id}`` sent open-loop at 50/s for random sessions.

Windows alternate: quiet (no sessions, the 1,000 peers only beat presence) and wave, B A B A B; the
quiet windows' GET latency is the reference. Memory (RSS) of every process is sampled throughout
and the peak reported. Finally ``decide()`` itself is timed at this scale, in this process.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import defaultdict

import httpx
import nats
from nats.aio.msg import Msg

from bench._common import (
    ROOT,
    Report,
    Stack,
    cli_output,
    cpu_s,
    median,
    percentile,
    quick,
    rss_mib,
    signup,
    upload_dataset,
    wait_idle_peers,
)
from bench._fakepeers import FakeSwarm, model_file
from swarmtrain.common import blob
from swarmtrain.common.events import (
    PeerDone,
    PeerLocked,
    SessionCompleted,
    SessionRequested,
    decode_event,
)
from swarmtrain.common.models import MlpSpec

PEERS, SESSIONS, PEERS_PER_SESSION = (40, 4, 10) if quick() else (1000, 100, 10)
WAVES, QUIET_S, GET_RATE, POST_CONCURRENCY = (1, 1.0, 20, 4) if quick() else (2, 3.0, 50, 10)
TRAIN_S = (0.2, 0.5) if quick() else (1.0, 3.0)


class Observer:
    """Arrival times of the events that open and close scheduler decisions."""

    def __init__(self) -> None:
        self.requested: dict[str, float] = {}
        self.first_lock: dict[str, float] = {}
        self.last_done: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self.counts: dict[str, int] = defaultdict(int)

    async def on_event(self, msg: Msg) -> None:
        now = time.perf_counter()
        event = decode_event(msg.data)
        self.counts[type(event).__name__] += 1
        match event:
            case SessionRequested():
                self.requested.setdefault(event.session_id, now)
            case PeerLocked():
                self.first_lock.setdefault(event.session_id, now)
            case PeerDone():
                self.last_done[event.session_id] = now
            case SessionCompleted():
                self.completed.setdefault(event.session_id, now)

    def start_decisions(self, sessions: list[str]) -> list[float]:
        return [self.first_lock[s] - self.requested[s] for s in sessions if s in self.first_lock]

    def completion_decisions(self, sessions: list[str]) -> list[float]:
        return [self.completed[s] - self.last_done[s] for s in sessions if s in self.completed]


class Poller:
    """``GET /sessions/{id}`` open-loop at a fixed rate; latencies of the answers."""

    def __init__(self, client: httpx.AsyncClient, rate: float) -> None:
        self.client, self.rate = client, rate
        self.ids: list[str] = []
        self.latencies: list[float] = []
        self.errors = 0
        self._limit = asyncio.Semaphore(20)

    async def _one(self, sid: str) -> None:
        async with self._limit:
            t = time.perf_counter()
            try:
                resp = await self.client.get(f"/sessions/{sid}")
            except httpx.HTTPError:  # a connection dropped under load: an error, not a crash
                self.errors += 1
                return
            if resp.status_code == 200:
                self.latencies.append(time.perf_counter() - t)
            else:
                self.errors += 1

    async def run(self, stop: asyncio.Event) -> None:
        tasks: set[asyncio.Task[None]] = set()
        next_at = time.perf_counter()
        while not stop.is_set():
            if self.ids:
                task = asyncio.create_task(self._one(random.choice(self.ids)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_at += 1 / self.rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await asyncio.gather(*tasks)


async def sample_rss(st: Stack, peak: dict[str, float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for name, mib in (await asyncio.to_thread(st.rss)).items():
            peak[name] = max(peak.get(name, 0.0), mib)
        await asyncio.sleep(0.5)


async def wave(
    client: httpx.AsyncClient, body: dict[str, object], swarm: FakeSwarm, observer: Observer, poller: Poller
) -> tuple[list[str], list[float]]:
    """Request SESSIONS sessions; returns their ids and POST -> all Train received latencies."""
    limit = asyncio.Semaphore(POST_CONCURRENCY)
    ids: list[str] = []
    starts: list[float] = []

    async def one() -> None:
        async with limit:
            t0 = time.perf_counter()
            resp = await client.post("/sessions", json=body)
            if resp.status_code != 201:
                raise RuntimeError(f"POST /sessions: {resp.status_code} {resp.text[:300]}")
        sid = resp.json()["session_id"]
        ids.append(sid)
        poller.ids.append(sid)
        arrivals = await swarm.wait_trains(sid, PEERS_PER_SESSION, timeout=120)
        starts.append(max(arrivals) - t0)

    await asyncio.gather(*(one() for _ in range(SESSIONS)))
    deadline = time.monotonic() + 180
    while not all(s in observer.completed for s in ids):
        if time.monotonic() > deadline:
            raise RuntimeError("the wave's sessions did not all complete in 180 s")
        await asyncio.sleep(0.1)
    return ids, starts


def time_decide() -> dict[str, float]:
    """``decide()`` at this scale, in-process: 1,000 online peers, 100 running and 200 ended sessions."""
    from swarmtrain.common.events import (
        Hyperparameters,
        PeerRegistered,
        PeerWentOnline,
        Presence,
        SessionStarted,
    )
    from swarmtrain.scheduler.actions import Clocks, Config
    from swarmtrain.scheduler.decide import decide
    from swarmtrain.scheduler.state import State, evolve, observe_presence

    state = State(started_at=time.monotonic())
    config = Config(uri=lambda key: f"file:///blobs/{key}")
    seq = 0

    def feed(event: object) -> None:
        nonlocal seq, state
        seq += 1
        state = evolve(state, seq, event, time.time())  # type: ignore[arg-type]

    peers = [f"p{i:016x}" for i in range(PEERS)]
    now = time.monotonic()
    for p in peers:
        feed(PeerRegistered(peer_id=p, name=p, device="cpu"))
        feed(PeerWentOnline(peer_id=p))
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu"), now)
    hp = Hyperparameters(epochs=1, batch_size=32, lr=0.01)
    for s in range(3 * SESSIONS):
        sid = f"{s:032x}"
        members = peers[(s % SESSIONS) * PEERS_PER_SESSION : (s % SESSIONS + 1) * PEERS_PER_SESSION]
        feed(
            SessionRequested(
                session_id=sid, owner_id="u", dataset_id="d", dataset_uri="file:///d", dataset_sha256="0" * 64,
                label_column="label", num_peers=PEERS_PER_SESSION, model=MlpSpec(),
                hyperparameters=[hp] * PEERS_PER_SESSION,
            )
        )  # fmt: skip
        feed(SessionStarted(session_id=sid, assignments=dict.fromkeys(members, hp)))
        if s < 2 * SESSIONS:
            feed(SessionCompleted(session_id=sid, best_peer_id=members[0], best_val_accuracy=0.5, model_uri="m"))
    calls = []
    for _ in range(20):
        t = time.perf_counter()
        decide(state, Clocks(now=time.monotonic(), wall=time.time()), config)
        calls.append(time.perf_counter() - t)
    return {"decide_ms_median": median(calls) * 1000, "decide_ms_max": max(calls) * 1000}


async def main() -> Report:
    report = Report("P7 scale")
    ms = 1000.0
    with Stack("p7") as st:
        env = {"SWARMTRAIN_MAX_ACTIVE_SESSIONS": "1000"}
        st.start("projector")
        st.start("scheduler")
        st.start("gateway", **env)
        st.wait_gateway()
        st.wait_log("scheduler", "state rebuilt")
        nc = await nats.connect(st.nats_url)
        observer = Observer()
        subs = [await nc.subscribe(s, cb=observer.on_event) for s in ("session.*.events", "peer.*.events")]
        dataset = ROOT / "examples" / "digits.csv"
        swarm = FakeSwarm(
            nc,
            PEERS,
            mode="core",
            train_s=lambda: random.uniform(*TRAIN_S),
            store=blob.FileStore(st.blob_dir),
            model=model_file(dataset),
        )
        stop_rss = asyncio.Event()
        peak: dict[str, float] = {}
        rss_task = asyncio.create_task(sample_rss(st, peak, stop_rss))
        t = time.perf_counter()
        await swarm.start()
        await wait_idle_peers(st.database_url, PEERS, timeout=120)
        online_s = time.perf_counter() - t

        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=st.gateway_url, timeout=60, limits=limits) as client:
            await signup(client)
            body = {
                "dataset_id": await upload_dataset(client, dataset),
                "num_peers": PEERS_PER_SESSION,
                "hyperparameters": {"epochs": 1, "batch_size": 32, "lr": 0.01},
            }
            poller = Poller(client, GET_RATE)
            first = await client.post("/sessions", json=body)  # one session so quiet windows have one to read
            first.raise_for_status()
            poller.ids.append(first.json()["session_id"])
            await swarm.wait_trains(first.json()["session_id"], PEERS_PER_SESSION)

            quiet: list[float] = []
            loaded: list[float] = []
            start_decisions: list[float] = []
            completion_decisions: list[float] = []
            start_latency: list[float] = []
            wave_s: list[float] = []
            for w in range(WAVES + 1):
                await wait_idle_peers(st.database_url, PEERS, timeout=120)
                stop = asyncio.Event()
                poller.latencies = []
                polling = asyncio.create_task(poller.run(stop))
                await asyncio.sleep(QUIET_S)
                stop.set()
                await polling
                quiet += poller.latencies
                if w == WAVES:
                    break
                stop = asyncio.Event()
                poller.latencies = []
                polling = asyncio.create_task(poller.run(stop))
                t = time.perf_counter()
                ids, starts = await wave(client, body, swarm, observer, poller)
                wave_s.append(time.perf_counter() - t)
                stop.set()
                await polling
                loaded += poller.latencies
                start_decisions += observer.start_decisions(ids)
                completion_decisions += observer.completion_decisions(ids)
                start_latency += starts
            get_errors = poller.errors
        stop_rss.set()
        await rss_task
        cpu = st.cpu_seconds()
        cpu["simulator (this process)"] = cpu_s(os.getpid())
        peak["simulator (this process)"] = rss_mib(os.getpid())
        await swarm.close()
        for sub in subs:
            await sub.unsubscribe()
        await nc.drain()

    decisions = start_decisions + completion_decisions
    row = report.add(
        "scheduler decision p99 (start + completion)",
        percentile(decisions, 99) * ms,
        "ms",
        reference=percentile(decisions, 50) * ms,
        reference_name="its own p50",
        target="p99 <= 50 ms",
    )
    row.met = row.value <= 50
    report.add(
        "scheduler start decision p99",
        percentile(start_decisions, 99) * ms,
        "ms",
        reference=percentile(start_decisions, 50) * ms,
        reference_name="p50",
        note="SessionRequested -> first PeerLocked",
    )
    report.add(
        "scheduler completion decision p99",
        percentile(completion_decisions, 99) * ms,
        "ms",
        reference=percentile(completion_decisions, 50) * ms,
        reference_name="p50",
        note="last PeerDone -> SessionCompleted",
    )
    row = report.add(
        "GET /sessions/{id} p99 under load",
        percentile(loaded, 99) * ms,
        "ms",
        reference=percentile(quiet, 99) * ms,
        reference_name="p99 in quiet windows",
        target="p99 <= 50 ms",
    )
    row.met = row.value <= 50
    report.add(
        "GET /sessions/{id} p50 under load",
        percentile(loaded, 50) * ms,
        "ms",
        reference=percentile(quiet, 50) * ms,
        reference_name="p50 in quiet windows",
    )
    report.extra = {
        "peers": PEERS,
        "sessions_per_wave": SESSIONS,
        "waves": WAVES,
        "peers_online_s": online_s,
        "wave_s": wave_s,
        "post_to_all_train_ms": {
            "p50": percentile(start_latency, 50) * ms,
            "p99": percentile(start_latency, 99) * ms,
        },
        "get_samples": {"quiet": len(quiet), "loaded": len(loaded), "errors": get_errors},
        "peak_rss_mib": peak,
        "cpu_s": cpu,
        "events_seen": dict(observer.counts),
        **time_decide(),
    }
    return report


if __name__ == "__main__":
    asyncio.run(main()).write(cli_output())
