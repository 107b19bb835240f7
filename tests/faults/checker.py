"""A checker in the spirit of Jepsen's: what producers were told is stored, against what is stored,
against what the read models show.

- **acknowledged**: every publish whose JetStream PubAck the tap saw (tap.py), by ``Nats-Msg-Id``
  (= ``event_id``), and every id the gateway answered 201 for (sessions, datasets).
- **stored**: the EVENTS stream read from the test's first sequence on.
- **shown**: the ``heartbeats`` and ``sessions`` tables and ``GET /sessions/{id}/metrics``.

Counted, each a list of what it found (so a failure names it):

- lost: acknowledged but not stored; stored but not shown (a heartbeat row or metric point, a
  session row, a dataset row).
- duplicated: one ``event_id`` stored twice; one (session, peer, epoch) heartbeat stored, shown as
  a row or as a metric point twice.
- unexpected: stored but never seen published by anyone (outside the tap's own reconnect gaps);
  shown but not stored (a row with no event behind it, a point with no row).

``rebuild_diff`` replays the log into a scratch database with ``swarmtrain projections rebuild`` and
compares its tables with the live ones.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats
import nats.errors
from nats.js import api

from swarmtrain.common import bus, servers
from swarmtrain.common.events import (
    Event,
    Heartbeat,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    decode_event,
)
from swarmtrain.projector.projection import TABLES

from .harness import Api, FaultStack

GAP_SLACK_S = 2.0
"""An event stored while the tap was reconnecting is not counted unexpected if it was made this close
to the tap's gap (producers may reconnect a moment before the tap does)."""


@dataclass(frozen=True)
class Stored:
    seq: int
    subject: str
    msg_id: str | None
    data: bytes
    event: Event | None


@dataclass
class Report:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    unwitnessed: int = 0
    """Stored events the tap could not see being published (it was reconnecting): not counted."""
    heartbeats: int = 0
    """Heartbeats of the test's sessions in the stream: what the checker compared."""

    @property
    def counts(self) -> tuple[int, int, int]:
        return len(self.lost), len(self.duplicated), len(self.unexpected)

    def __str__(self) -> str:
        return (
            f"lost {self.lost[:10]}\nduplicated {self.duplicated[:10]}\nunexpected {self.unexpected[:10]}"
            f"\n(unwitnessed {self.unwitnessed}, heartbeats {self.heartbeats})"
        )


async def last_seq(nats_url: str) -> int:
    nc = await nats.connect(nats_url.split(","))
    try:
        return await bus.last_sequence(nc.jetstream())
    finally:
        await nc.drain()


async def read_stream(nats_url: str, after: int) -> list[Stored]:
    """Every message of EVENTS past ``after``, as stored (undecodable ones with ``event=None``)."""
    nc = await nats.connect(nats_url.split(","))
    out: list[Stored] = []
    try:
        js = nc.jetstream()
        last = await bus.last_sequence(js)
        if last <= after:
            return out
        sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, start_seq=after + 1, ack=api.AckPolicy.NONE)
        while not out or out[-1].seq < last:
            try:
                msgs = await sub.fetch(1024, timeout=5)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            for msg in msgs:
                try:
                    event: Event | None = decode_event(msg.data)
                except ValueError:
                    event = None
                msg_id = (msg.headers or {}).get("Nats-Msg-Id")
                out.append(Stored(bus.stream_seq(msg), msg.subject, msg_id, msg.data, event))
        await sub.unsubscribe()
    finally:
        await nc.drain()
    return out


@dataclass
class Tap:
    acked: dict[str, int]
    published: set[str]
    gaps: list[tuple[float, float]]


def read_tap(stack: FaultStack) -> Tap:
    acked: dict[str, int] = {}
    published: set[str] = set()
    gaps: list[tuple[float, float]] = []
    for line in stack.tap_file.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "ack":
            acked.setdefault(record["id"], record["seq"])
        elif record["kind"] == "pub" and record["id"]:
            published.add(record["id"])
        elif record["kind"] == "gap":
            gaps.append((record["start"] or record["end"], record["end"]))
    return Tap(acked, published, gaps)


class Checker:
    """Made when a test starts (it notes the stream's position), asked once the test's sessions ended."""

    def __init__(self, stack: FaultStack, api: Api) -> None:
        self.stack, self.api = stack, api
        self.baseline = asyncio.run(last_seq(stack.nats_url))
        self.injected: set[str] = set()
        """msg ids the test stored itself (malformed, poison, a copy of a stored event under a new
        id): witnessed, and not counted as the platform's duplicates in the stream."""

    def check(self, sids: list[str]) -> Report:
        from .harness import wait_for

        wait_for(self.stack.caught_up, 60, "the read models to catch up with the stream")
        # the stream up to its end now, then the tap: every publish of a stored event was witnessed
        # before it was stored; an acknowledgement past ``end`` (a release appended just after the
        # session's end) is judged by no one, rather than taken for a loss
        end = asyncio.run(last_seq(self.stack.nats_url))
        stored = [s for s in asyncio.run(read_stream(self.stack.nats_url, self.baseline)) if s.seq <= end]
        tap = read_tap(self.stack)
        rows, sessions, datasets = asyncio.run(self._read_models(sids))
        report = Report()
        self._events(report, stored, tap, end)
        self._rows(report, sids, stored, rows, sessions, datasets)
        return report

    # ------------------------------------------------------------------ the log

    def _events(self, report: Report, stored: list[Stored], tap: Tap, end: int) -> None:
        ids = Counter(s.msg_id for s in stored if s.msg_id)
        event_ids = Counter(s.event.event_id if s.event else s.msg_id for s in stored if s.msg_id not in self.injected)
        report.duplicated += [f"event {i} stored {n} times" for i, n in event_ids.items() if n > 1]
        for msg_id, seq in tap.acked.items():
            if self.baseline < seq <= end and msg_id not in ids:
                report.lost.append(f"event {msg_id} acknowledged at seq {seq}, not in the stream")
        for s in stored:
            if s.msg_id in tap.published or s.msg_id in self.injected:
                continue
            if s.msg_id is not None and s.event is not None and self._in_gap(s.event, tap):
                report.unwitnessed += 1
                continue
            report.unexpected.append(f"seq {s.seq} ({s.subject}, id {s.msg_id}) stored, never published")

    @staticmethod
    def _in_gap(event: Event, tap: Tap) -> bool:
        at = event.occurred_at.timestamp()
        return any(start - GAP_SLACK_S <= at <= end + GAP_SLACK_S for start, end in tap.gaps)

    # ------------------------------------------------------------------ the read models

    async def _read_models(self, sids: list[str]) -> tuple[list[asyncpg.Record], set[str], set[str]]:
        conn = await asyncpg.connect(self.stack.env["SWARMTRAIN_DATABASE_URL"])
        try:
            rows = await conn.fetch(
                "SELECT seq, session_id, peer_id, epoch FROM heartbeats WHERE session_id = ANY($1)", sids
            )
            sessions = {r[0] for r in await conn.fetch("SELECT session_id FROM sessions")}
            datasets = {r[0] for r in await conn.fetch("SELECT dataset_id FROM datasets")}
        finally:
            await conn.close()
        return list(rows), sessions, datasets

    def _rows(
        self,
        report: Report,
        sids: list[str],
        stored: list[Stored],
        rows: list[asyncpg.Record],
        sessions: set[str],
        datasets: set[str],
    ) -> None:
        assigned: dict[str, set[str]] = {}
        requested: set[str] = set()
        beats: dict[int, tuple[str, str, int]] = {}
        copies: set[int] = set()  # copies the test stored on purpose: they must change nothing
        for s in stored:
            match s.event:
                case SessionStarted(session_id=sid) if sid in sids:
                    assigned.setdefault(sid, set()).update(s.event.assignments)
                case ShardReassigned(session_id=sid) if sid in sids:  # the peer that took a shard over
                    assigned.setdefault(sid, set()).add(s.event.to_peer_id)
                case SessionRequested(session_id=sid):
                    requested.add(sid)
                case Heartbeat(session_id=sid) if sid in sids:
                    beats[s.seq] = (sid, s.event.peer_id, s.event.epoch)
                    if s.msg_id in self.injected:
                        copies.add(s.seq)
        report.heartbeats = len(beats)
        expected = {
            seq: key for seq, key in beats.items() if seq not in copies and key[1] in assigned.get(key[0], set())
        }
        keys = Counter(key for seq, key in beats.items() if seq not in copies)
        report.duplicated += [f"heartbeat {k} stored {n} times" for k, n in keys.items() if n > 1]

        # heartbeat rows: one per stored beat of an assigned peer, none for a copy, and nothing else
        shown = {r["seq"]: (r["session_id"], r["peer_id"], r["epoch"]) for r in rows}
        report.lost += [f"heartbeat {k} (seq {seq}) has no row" for seq, k in expected.items() if seq not in shown]
        report.unexpected += [f"row {k} (seq {seq}) has no event" for seq, k in shown.items() if expected.get(seq) != k]
        report.duplicated += [f"heartbeat {k}: {n} rows" for k, n in Counter(shown.values()).items() if n > 1]

        # /sessions/{id}/metrics: one point per row
        for sid in sids:
            body: dict[str, Any] = self.api.metrics(sid)
            points = Counter((sid, p["peer_id"], pt["epoch"]) for p in body["peers"] for pt in p["points"])
            want = Counter(k for k in shown.values() if k[0] == sid)
            report.lost += [f"metric point {k} missing" for k in want - points]
            report.unexpected += [f"metric point {k} has no row" for k in points - want]
            report.duplicated += [f"metric point {k} shown {n} times" for k, n in points.items() if n > 1]

        # what the gateway acknowledged with a 201 is stored and shown
        for sid in (s for s in self.api.acked_sessions if s in sids):
            if sid not in requested:
                report.lost.append(f"session {sid} acknowledged (201), no SessionRequested stored")
            if sid not in sessions:
                report.lost.append(f"session {sid} acknowledged (201), no row")
        for did in self.api.acked_datasets:
            if did not in datasets:
                report.lost.append(f"dataset {did} acknowledged (201), no row")


# ------------------------------------------------------------------ rebuild


async def _snapshot(dsn: str) -> tuple[int, dict[str, list[tuple[Any, ...]]]]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            position = int(await conn.fetchval("SELECT position FROM projection_position WHERE name = 'main'"))
            tables = {t: sorted(tuple(r) for r in await conn.fetch(f"SELECT * FROM {t}")) for t in TABLES}
    finally:
        await conn.close()
    return position, tables


def rebuild_diff(stack: FaultStack, attempts: int = 3) -> list[str]:
    """``swarmtrain projections rebuild`` into a scratch database; the tables that differ from the live
    ones at the same stream position ([] when they are equal)."""
    from .harness import wait_for

    diffs: list[str] = ["never compared at one position"]
    for _ in range(attempts):
        scratch = f"rebuild{uuid.uuid4().hex[:8]}"
        servers.create_database(stack.pg_port, scratch)
        dsn = servers.postgres_url(stack.pg_port, scratch)
        result = subprocess.run(
            stack.cli("projections", "rebuild"),
            env={**stack.env, "SWARMTRAIN_DATABASE_URL": dsn},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        rebuilt_at, rebuilt = asyncio.run(_snapshot(dsn))
        wait_for(
            lambda at=rebuilt_at: (r := stack.ready()) and r["projection_position"] >= at,  # type: ignore[misc]
            60,
            "the live projection to reach the rebuild's position",
        )
        live_at, live = asyncio.run(_snapshot(stack.env["SWARMTRAIN_DATABASE_URL"]))
        if live_at != rebuilt_at:
            continue  # an event landed in between (a peer going on- or offline): take both again
        return [f"{t}: live {len(live[t])} rows, rebuilt {len(rebuilt[t])}" for t in TABLES if live[t] != rebuilt[t]]
    return diffs
