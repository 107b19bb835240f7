"""P3 projector throughput vs the two limits it sits between, interleaved in one run.

The EVENTS stream is loaded once with a realistic mix (peers registering, sessions requested and
started, then mostly ``Heartbeat``, then peers done and sessions completed). Each trial is a fresh
process that has imported everything before the clock starts, and times from the first batch it
gets to the last:

- ``projector``: the real ``swarmtrain.projector.service.run`` from position 0 on emptied read
  models, timed by its own ``NOTIFY`` (first to last position).
- ``raw consumer``: an ephemeral pull consumer of the same stream: fetch 512, ``decode_event`` each,
  ``ack`` each message (explicit ack), no database. The issue's reference.
- ``raw consumer, AckAll``: the same with one ack per fetched batch (the projector's ack policy).
- ``asyncpg executemany`` / ``copy_records_to_table``: the heartbeat rows of the same events
  written to a scratch table shaped like ``heartbeats``, one transaction per 512 rows, no NATS.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict

import asyncpg
import nats
import uvloop
from nats.js import api

from bench._common import Report, Stack, cli_output, median, quick
from swarmtrain.common import bus
from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    PeerDone,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOnline,
    SessionCompleted,
    SessionRequested,
    SessionStarted,
    decode_event,
    encode,
)
from swarmtrain.common.models import MlpSpec

SESSIONS, PEERS_PER_SESSION, TOTAL = (10, 4, 4_000) if quick() else (50, 4, 40_000)
REPS = 1 if quick() else 3
BATCH = 512
MODES = (
    ("projector", "raw")
    if quick()
    else ("projector", "raw", "raw-ackall", "pg-executemany", "pg-copy", "projector-uvloop", "raw-uvloop")
)
SCRATCH = """CREATE TABLE IF NOT EXISTS bench_heartbeats (
    seq bigint PRIMARY KEY, session_id text NOT NULL, peer_id text NOT NULL, epoch integer NOT NULL,
    loss double precision NOT NULL, accuracy double precision NOT NULL, val_loss double precision,
    val_accuracy double precision, samples_per_s double precision NOT NULL, occurred_at timestamptz NOT NULL)"""


def workload() -> list[Event]:
    peers = [f"p{i:016x}" for i in range(SESSIONS * PEERS_PER_SESSION)]
    out: list[Event] = []
    for p in peers:
        out += [PeerRegistered(peer_id=p, name=p, device="cpu"), PeerWentOnline(peer_id=p)]
    sessions = {f"s{s:031x}": peers[s * PEERS_PER_SESSION : (s + 1) * PEERS_PER_SESSION] for s in range(SESSIONS)}
    hp = Hyperparameters(epochs=1000, batch_size=64, lr=0.01)
    for sid, members in sessions.items():
        out.append(
            SessionRequested(
                session_id=sid,
                owner_id="u1",
                dataset_id="d1",
                dataset_uri="file:///d.csv",
                dataset_sha256="0" * 64,
                label_column="label",
                num_peers=len(members),
                model=MlpSpec(),
                hyperparameters=[hp] * len(members),
            )
        )
        out += [PeerLocked(peer_id=p, session_id=sid) for p in members]
        out.append(SessionStarted(session_id=sid, assignments=dict.fromkeys(members, hp)))
    tail: list[Event] = []
    for sid, members in sessions.items():
        tail += [
            PeerDone(
                session_id=sid,
                peer_id=p,
                model_uri="file:///m",
                model_sha256="0" * 64,
                epochs=1,
                loss=0.1,
                accuracy=0.9,
                train_seconds=1.0,
            )
            for p in members
        ]
        tail.append(SessionCompleted(session_id=sid, best_peer_id=members[0], best_val_accuracy=0.9, model_uri="m"))
        tail += [PeerReleased(peer_id=p, session_id=sid) for p in members]
    pairs = [(sid, p) for sid, members in sessions.items() for p in members]
    epoch = 0
    while len(out) + len(tail) < TOTAL:
        epoch += 1
        for sid, p in pairs[: TOTAL - len(out) - len(tail)]:
            out.append(
                Heartbeat(
                    session_id=sid,
                    peer_id=p,
                    epoch=epoch,
                    epochs=1000,
                    loss=1.0 / epoch,
                    accuracy=0.5,
                    val_loss=1.1 / epoch,
                    val_accuracy=0.5,
                    samples_per_s=1e5,
                )
            )
    return out + tail


async def load_stream(nats_url: str, events: list[Event]) -> int:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    for i in range(0, len(events), 1000):
        await asyncio.gather(
            *(
                js.publish(e.subject, encode(e), headers={"Nats-Msg-Id": e.event_id}, stream=bus.EVENTS_STREAM)
                for e in events[i : i + 1000]
            )
        )
    last = await bus.last_sequence(js)
    await nc.drain()
    return last


# ------------------------------------------------------------------ trials (each in its own process)


async def trial_projector(nats_url: str, db: str, last: int) -> tuple[float, int, float]:
    from swarmtrain.common.settings import Settings
    from swarmtrain.projector import service
    from swarmtrain.projector.projection import CHANNEL

    settings = Settings(nats_url=nats_url, database_url=db, log_level="warning")
    marks: list[tuple[float, int, float]] = []
    finished = asyncio.Event()

    def on_notify(_c: object, _p: int, _ch: str, payload: str) -> None:
        marks.append((time.perf_counter(), int(payload), time.process_time()))
        if int(payload) >= last:
            finished.set()

    listener = await asyncpg.connect(db)
    await listener.add_listener(CHANNEL, on_notify)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(settings, stop))
    await asyncio.wait_for(finished.wait(), 300)
    stop.set()
    await task
    await listener.close()
    (t0, p0, c0), (t1, p1, c1) = marks[0], marks[-1]
    return t1 - t0, p1 - p0, c1 - c0


async def trial_raw(nats_url: str, last: int, ack_all: bool) -> tuple[float, int, float]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    policy = api.AckPolicy.ALL if ack_all else api.AckPolicy.EXPLICIT
    sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=policy)
    seen, t0, first = 0, 0.0, 0
    while seen < last:
        msgs = await sub.fetch(BATCH, timeout=5)
        for msg in msgs:
            decode_event(msg.data)
            if not ack_all:
                await msg.ack()
        if ack_all:
            await msgs[-1].ack()
        seen = bus.stream_seq(msgs[-1])
        if not t0:
            t0, c0, first = time.perf_counter(), time.process_time(), seen
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await sub.unsubscribe()
    await nc.drain()
    return elapsed, last - first, cpu


async def trial_pg(db: str, rows: list[tuple[object, ...]], copy: bool) -> tuple[float, int, float]:
    conn = await asyncpg.connect(db)
    await conn.execute("TRUNCATE bench_heartbeats")
    insert = "INSERT INTO bench_heartbeats VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING"
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(rows), BATCH):
        async with conn.transaction():
            if copy:
                await conn.copy_records_to_table("bench_heartbeats", records=rows[i : i + BATCH])
            else:
                await conn.executemany(insert, rows[i : i + BATCH])
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await conn.close()
    return elapsed, len(rows), cpu


def heartbeat_rows(events: list[Event]) -> list[tuple[object, ...]]:
    return [
        (
            seq,
            e.session_id,
            e.peer_id,
            e.epoch,
            e.loss,
            e.accuracy,
            e.val_loss,
            e.val_accuracy,
            e.samples_per_s,
            e.occurred_at,
        )
        for seq, e in enumerate(events, start=1)
        if isinstance(e, Heartbeat)
    ]


async def trial(mode: str, nats_url: str, db: str, last: int) -> tuple[float, int, float]:
    match mode.removesuffix("-uvloop"):
        case "projector":
            return await trial_projector(nats_url, db, last)
        case "raw" | "raw-ackall":
            return await trial_raw(nats_url, last, ack_all=mode == "raw-ackall")
        case _:
            rows = heartbeat_rows(workload())
            return await trial_pg(db, rows, copy=mode == "pg-copy")


def run_trial(mode: str, nats_url: str, db: str, last: int) -> tuple[float, int, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.p3_projector", "--trial", mode, nats_url, db, str(last)]
        + (["--quick"] if quick() else []),
        check=True,
        capture_output=True,
        text=True,
    )
    seconds, count, cpu = json.loads(out.stdout.strip().splitlines()[-1])
    return float(seconds), int(count), float(cpu)


async def reset_read_models(db: str) -> None:
    """Empty read models AND the projector's bookkeeping (the ids it applied: left in place, every
    event after the first trial would be skipped as a copy, and the trial would time the skip)."""
    from swarmtrain.projector.projection import BOOKKEEPING, TABLES, ensure_schema

    conn = await asyncpg.connect(db)
    await ensure_schema(conn)
    await conn.execute(SCRATCH)
    await conn.execute(f"TRUNCATE {', '.join(TABLES + BOOKKEEPING)}")
    await conn.execute("UPDATE projection_position SET position = 0")
    await conn.close()


async def check_projection(db: str) -> dict[str, int]:
    conn = await asyncpg.connect(db)
    counts = {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in ("heartbeats", "sessions", "peers")}
    counts["completed"] = int(await conn.fetchval("SELECT count(*) FROM sessions WHERE status = 'completed'"))
    counts["position"] = int(await conn.fetchval("SELECT position FROM projection_position"))
    await conn.close()
    return counts


async def main() -> Report:
    report = Report("P3 projector")
    events = workload()
    n_heartbeats = sum(isinstance(e, Heartbeat) for e in events)
    with Stack("p3") as st:
        t = time.perf_counter()
        last = await load_stream(st.nats_url, events)
        expected = {
            "heartbeats": n_heartbeats,
            "sessions": SESSIONS,
            "peers": SESSIONS * PEERS_PER_SESSION,
            "completed": SESSIONS,
            "position": last,
        }
        load_s = time.perf_counter() - t
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in MODES}
        counts: dict[str, int] = {}
        for _ in range(REPS):
            for mode in MODES:  # interleaved: every mode once per round
                if mode.startswith("projector"):
                    await reset_read_models(st.database_url)
                before = st.cpu_seconds()
                seconds, count, own_cpu = await asyncio.to_thread(run_trial, mode, st.nats_url, st.database_url, last)
                after = st.cpu_seconds()
                rates[mode].append(count / seconds)
                cpu[mode]["trial process"].append(own_cpu)
                for name in after:
                    cpu[mode][name].append(after[name] - before.get(name, 0.0))
                if mode.startswith("projector"):
                    counts = await check_projection(st.database_url)
                    if counts != expected:
                        raise RuntimeError(f"{mode} projected {counts}, not {expected}")
    med = {m: median(v) for m, v in rates.items()}
    row = report.add(
        "events/s applied",
        med["projector"],
        "ev/s",
        reference=med["raw"],
        reference_name="raw consumer, ack each",
        target=">= 0.9 and >= 20k/s",
    )
    row.met = (row.ratio or 0) >= 0.9 and med["projector"] >= 20_000
    others = (
        ("raw-ackall", "events/s applied", "raw consumer, AckAll per batch", ""),
        ("pg-executemany", "events/s applied", "asyncpg executemany, heartbeat rows", ""),
        ("pg-copy", "events/s applied", "asyncpg copy_records_to_table, heartbeat rows", ""),
    )
    for mode, metric, name, note in others:
        if mode in med:
            report.add(metric, med["projector"], "ev/s", reference=med[mode], reference_name=name, note=note)
    if "projector-uvloop" in med:
        report.add(
            "events/s applied, both under uvloop",
            med["projector-uvloop"],
            "ev/s",
            reference=med["raw-uvloop"],
            reference_name="raw consumer, ack each, uvloop",
            note="what-if: the services run asyncio's own loop",
        )
    report.extra = {
        "events": last,
        "heartbeats": n_heartbeats,
        "stream_load_events_per_s": last / load_s,
        "rates": rates,
        "cpu_s_per_trial_median": {m: {k: median(v) for k, v in c.items()} for m, c in cpu.items()},
        "cpu_note": "trial process: CPU inside the timed window; the servers: over the whole trial",
        "final_projection": counts,
        "expected": expected,
    }
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trial"]:
        mode, url, db, last_seq = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        runner = uvloop.run if mode.endswith("-uvloop") else asyncio.run
        print(json.dumps(runner(trial(mode, url, db, last_seq))))
    else:
        asyncio.run(main()).write(cli_output())
