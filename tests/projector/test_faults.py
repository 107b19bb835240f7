"""Nothing doubled, never stuck: copies past the dedupe window, two projectors side by side, a
NATS or PostgreSQL outage (issue 11). Real nats-server, real PostgreSQL, real projector processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest

from swarmtrain.common import bus, events, servers
from swarmtrain.common.events import Heartbeat
from swarmtrain.common.settings import Settings
from swarmtrain.projector import projection, service
from tests.projector.test_projector import db, session_story, snapshot, wait_position
from tests.support import wait_for

__all__ = ["db"]  # the fixture, shared


async def _store_again(js: Any, event: Any) -> int:
    """Store a copy of ``event`` as JetStream would after its two-minute dedupe window: same body,
    same event_id, a new stream sequence."""
    ack = await js.publish(
        event.subject, events.encode(event), headers={"Nats-Msg-Id": f"{event.event_id}-late"}, stream="EVENTS"
    )
    return int(ack.seq)


def _beat(sid: str, epoch: int) -> Heartbeat:
    return Heartbeat(
        session_id=sid, peer_id="p1", epoch=epoch, epochs=2, loss=1.0 / epoch, accuracy=0.5, samples_per_s=1.0
    )


async def test_a_copy_stored_after_the_dedupe_window_changes_nothing(
    js: Any, projector: None, db: asyncpg.Connection
) -> None:
    story = session_story()
    running, ending = story[:8], story[8:]  # up to both heartbeats; then done, completed, released
    seq = 0
    for event in running:
        seq = await bus.append(js, event)
    await wait_position(db, seq)
    before = await snapshot(db)
    for event in running:  # every event stored again
        seq = await _store_again(js, event)
    # another beat for an epoch already beaten (a new id: a peer that re-sent it), late
    seq = await bus.append(js, msgspec.structs.replace(_beat("s1", 1), occurred_at=running[6].occurred_at))
    await wait_position(db, seq)
    assert await snapshot(db) == before

    for event in ending:
        seq = await bus.append(js, event)
    await wait_position(db, seq)
    ended = await snapshot(db)
    assert ended["sessions"][0][5] == "completed"
    # a completed session takes no more heartbeats, copies or new
    seq = await _store_again(js, story[7])
    seq = await bus.append(js, _beat("s1", 3))
    await wait_position(db, seq)
    assert await snapshot(db) == ended
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 2


# ------------------------------------------------------------------ projectors as processes


def _start_projector(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SWARMTRAIN_NATS_URL": settings.nats_url,
        "SWARMTRAIN_DATABASE_URL": settings.database_url,
        "SWARMTRAIN_LOG_FORMAT": "json",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "swarmtrain.cli.main", "projector"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            servers.stop(proc, signal.SIGTERM)


async def _leader(db: asyncpg.Connection) -> str | None:
    """The application_name of the connection that holds the projector's leader lock."""
    name: str | None = await db.fetchval(
        """
        SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = $1
        """,
        service.LEADER_LOCK,
    )
    return name


async def _connected(db: asyncpg.Connection, proc: subprocess.Popen[bytes]) -> bool:
    name = f"{service.LEADER_APP}:{proc.pid}"
    return bool(await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name))


async def test_two_projectors_one_leads_and_the_other_takes_over(
    js: Any, settings: Settings, db: asyncpg.Connection, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    first = _start_projector(settings, tmp_path / "first.log")
    processes.append(first)

    async def first_leads() -> bool:
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        return await _leader(db) == f"{service.LEADER_APP}:{first.pid}"

    await wait_for(first_leads, "the first projector to lead", timeout=30)
    second = _start_projector(settings, tmp_path / "second.log")
    processes.append(second)
    await wait_for(lambda: _connected(db, second), "the second projector to stand by", timeout=30)

    seq = 0
    for event in session_story("s1"):
        seq = await bus.append(js, event)
    await wait_position(db, seq, timeout=30)
    assert first.poll() is None and second.poll() is None  # side by side, neither crashed
    assert await _leader(db) == f"{service.LEADER_APP}:{first.pid}"

    first.send_signal(signal.SIGKILL)  # the leader dies
    first.wait(15)
    for event in session_story("s2"):
        seq = await bus.append(js, event)
    await wait_position(db, seq, timeout=60)
    assert second.poll() is None, (tmp_path / "second.log").read_text()
    assert await _leader(db) == f"{service.LEADER_APP}:{second.pid}"

    state = await snapshot(db)
    assert [r[0] for r in state["sessions"]] == ["s1", "s2"]
    assert len(state["heartbeats"]) == 4 and len(state["users"]) == 1
    assert await db.fetchval("SELECT count(*) FROM applied_events") == 2 * len(session_story())
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    servers.stop(second, signal.SIGTERM)
    await service.rebuild(settings)  # the log, replayed alone, gives the same rows
    assert await snapshot(db) == state


# ------------------------------------------------------------------ outages


@pytest.fixture
async def running_projector(settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(settings, stop))
    yield task
    stop.set()
    await asyncio.wait_for(task, 30)


async def _append_all(settings: Settings, story: list[Any]) -> int:
    """Append with a connection of its own (made once NATS answers again)."""
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js)
        seq = 0
        for event in story:
            seq = await bus.append(js, event)
        return seq
    finally:
        await nc.drain()


async def test_the_projector_rides_out_a_nats_restart(
    settings: Settings,
    nats_server: tuple[str, subprocess.Popen[bytes]],
    tmp_path: Path,
    running_projector: asyncio.Task[None],
    db: asyncpg.Connection,
) -> None:
    seq = await _append_all(settings, session_story("s1"))
    await wait_position(db, seq, timeout=30)
    url, proc = nats_server
    proc.send_signal(signal.SIGKILL)
    proc.wait(15)
    port = int(url.rsplit(":", 1)[1])
    restarted = servers.start_nats(port, tmp_path / "jetstream")  # the fixture's store
    try:
        seq = await _append_all(settings, session_story("s2"))
        await wait_position(db, seq, timeout=60)
        assert not running_projector.done()
        state = await snapshot(db)
        assert [r[0] for r in state["sessions"]] == ["s1", "s2"] and len(state["heartbeats"]) == 4
    finally:
        servers.stop(restarted, signal.SIGTERM)


async def test_commits_a_crash_took_back_are_applied_again_without_a_new_event(
    settings: Settings, running_projector: asyncio.Task[None], db: asyncpg.Connection
) -> None:
    """The projector commits without waiting for the fsync, so a PostgreSQL crash may take back its
    latest commits, position included (never one without the other). Simulated here: the read models,
    their bookkeeping and the position taken back to 0 in one transaction while the projector is idle.
    It applies them again from the stored position, with no new event to make it look."""
    seq = await _append_all(settings, session_story("s1"))
    await wait_position(db, seq, timeout=30)
    before = await snapshot(db)
    async with db.transaction():
        await db.execute(f"TRUNCATE {', '.join(projection.TABLES + projection.BOOKKEEPING)}")
        await db.execute("UPDATE projection_position SET position = 0")
    await wait_position(db, seq, timeout=30)
    assert await snapshot(db) == before
    assert not running_projector.done()


async def test_the_projector_rides_out_a_postgres_crash(settings: Settings, nats_url: str, tmp_path: Path) -> None:
    """A PostgreSQL of the test's own, crashed (immediate shutdown) and started again from its data."""
    port = servers.free_port()
    data = tmp_path / "pg"
    pg = servers.start_postgres(data, port, durable=False)
    own = msgspec.structs.replace(settings, database_url=servers.postgres_url(port))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(own, stop))
    conn: asyncpg.Connection | None = None
    try:

        async def connect() -> asyncpg.Connection:
            assert not task.done(), task
            c: asyncpg.Connection = await asyncpg.connect(own.database_url)
            return c

        conn = await connect()
        seq = await _append_all(own, session_story("s1"))
        await wait_position(conn, seq, timeout=30)
        await conn.close()
        pg.send_signal(signal.SIGQUIT)  # immediate shutdown: no checkpoint, a crash recovery on start
        pg.wait(15)
        seq = await _append_all(own, session_story("s2"))  # while PostgreSQL is away
        pg = servers.start_postgres(data, port, durable=False)
        conn = await connect()
        await wait_position(conn, seq, timeout=90)
        assert not task.done()
        assert await conn.fetchval("SELECT count(*) FROM heartbeats") == 4
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0  # an outage is not poison
        assert json.loads(await conn.fetchval("SELECT json_agg(session_id ORDER BY 1) FROM sessions")) == ["s1", "s2"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        if conn is not None:
            await conn.close()
        servers.stop(pg, signal.SIGINT)
