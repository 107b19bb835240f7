"""The projector: the only writer of PostgreSQL. Consumes EVENTS, commits, then acknowledges.

One projector projects at a time (the holder of a PostgreSQL advisory lock); more may run as
standbys. Even two at once could not double a row: each batch commits under the position row's
lock and skips what the position or an event id says was applied.

A batch commits with ``synchronous_commit = off`` (``deadletters.ASYNC_COMMIT``, a setting of the
projector's connections): no fsync waited
for per commit. Its position is in the same transaction and events are idempotent by id, so a
PostgreSQL crash loses at most the latest batches whole, and the projector, which resumes from the
stored position (never from its JetStream acks), applies them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from swarmtrain.common import bus, metrics, pg
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings
from swarmtrain.projector import deadletters
from swarmtrain.projector.deadletters import Delivery
from swarmtrain.projector.projection import BOOKKEEPING, NAME, TABLES, ensure_schema, lock_position, position

DURABLE = "projector"
LEADER_LOCK = 0x5357_5450
"""pg_advisory_lock key held, on a connection of its own, by the one projector that projects."""
STANDBY_POLL_S = 1.0
"""How often a standby projector asks for the leader's lock (the leader's death frees it at once)."""
LEADER_APP = "swarmtrain-projector"
"""The lock connection's application_name (with ``:<pid>``): who leads shows in pg_stat_activity."""
LEADER_CHECK_S = 1.0
"""How often the leader checks that its lock's connection is alive."""
BATCH = 1024
"""Events a fetch takes and a transaction applies at most (what has arrived, up to this)."""
log = get_logger("swarmtrain.projector")

_PG_DOWN = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""What reaching PostgreSQL raises while it is down, restarting or going away: the server's errors,
the client's on a connection that broke (``InterfaceError``) and its protocol state machine's
(``InternalClientError``, e.g. "cannot switch to state 15; another operation is in progress")."""


async def connect_db(settings: Settings, attempts: int = 60) -> asyncpg.Pool:
    """A pool on the read-model database, retried while PostgreSQL is still starting."""
    for attempt in range(attempts):
        try:
            pool = await pg.create_pool(
                settings.database_url, min_size=1, max_size=4, server_settings=deadletters.ASYNC_COMMIT
            )
            return pool
        except _PG_DOWN:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Project until ``stop``: one projector at a time (the holder of ``LEADER_LOCK``); others
    stand by and take over when it dies. A NATS or PostgreSQL outage is ridden out: the projector
    waits, then resumes from its stored position without being restarted."""
    async with contextlib.AsyncExitStack() as stack:
        pool = await connect_db(settings)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await ensure_schema(conn)
        nc = await bus.connect(settings, "projector")
        stack.push_async_callback(_drain, nc)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        while not stop.is_set():
            async with leadership(settings, stop) as over:
                if over is None:
                    return  # stopped while standing by
                log.info("projector leads")
                await _lead(pool, js, over)
            if not stop.is_set():
                log.warning("projector lost its lead; standing by")


async def _drain(nc: NATS) -> None:
    """Drain the connection; stopped while NATS is away, just close it."""
    try:
        await nc.drain()
    except nats.errors.Error:
        with contextlib.suppress(OSError, nats.errors.Error):  # its socket is gone already
            await nc.close()


@contextlib.asynccontextmanager
async def leadership(settings: Settings, stop: asyncio.Event) -> AsyncIterator[asyncio.Event | None]:
    """Hold ``LEADER_LOCK`` for the block: yields an event set once the lead is over (``stop``
    set, or the lock's connection gone and the lock with it), or None if ``stop`` was set before
    the lock was taken."""
    conn = await _take_lead(settings, stop)
    if conn is None:
        yield None
        return
    over = asyncio.Event()
    watch = asyncio.create_task(_watch_lead(conn, over, stop))
    try:
        yield over
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        with contextlib.suppress(*_PG_DOWN):
            await conn.close(timeout=2)  # ends the session: the lock is free for a standby


async def _take_lead(settings: Settings, stop: asyncio.Event) -> asyncpg.Connection | None:
    standing_by = False
    while not stop.is_set():
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                settings.database_url, timeout=5, server_settings={"application_name": f"{LEADER_APP}:{os.getpid()}"}
            )
        except _PG_DOWN as exc:
            log.warning("postgresql unreachable; waiting", error=repr(exc))
            await _pause(stop, STANDBY_POLL_S)
            continue
        try:
            while not stop.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK, timeout=5):
                    return conn
                if not standing_by:
                    log.info("another projector leads; standing by")
                    standing_by = True
                await _pause(stop, STANDBY_POLL_S)
        except _PG_DOWN as exc:
            log.warning("postgresql connection lost while standing by", error=repr(exc))
        with contextlib.suppress(*_PG_DOWN):
            await conn.close(timeout=2)
    return None


async def _watch_lead(conn: asyncpg.Connection, over: asyncio.Event, stop: asyncio.Event) -> None:
    try:
        while not stop.is_set():
            await _pause(stop, LEADER_CHECK_S)
            try:
                await conn.fetchval("SELECT 1", timeout=LEADER_CHECK_S * 5)
            except _PG_DOWN as exc:
                log.warning("the leader lock's connection is gone", error=repr(exc))
                return
    finally:
        over.set()


async def _lead(pool: asyncpg.Pool, js: JetStreamContext, over: asyncio.Event) -> None:
    """Project until the lead is ``over``: (re)create the durable consumer at the stored position
    and apply; an outage interrupts, and projecting starts again from the stored position."""
    while not over.is_set():
        try:
            await _project(pool, js, over)
        except (nats.errors.Error, deadletters.Rewound, *_PG_DOWN) as exc:
            log.warning("projection interrupted; resuming from the stored position", error=repr(exc))
            await _pause(over, 1.0)


async def _project(pool: asyncpg.Pool, js: JetStreamContext, halt: asyncio.Event) -> None:
    async with pool.acquire() as conn:
        reached = await position(conn)
        metrics.DEAD_LETTERS.set(await deadletters.count(conn))
    sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, durable=DURABLE, start_seq=reached + 1, ack=api.AckPolicy.ALL)
    log.info("projecting", position=reached)
    # The next fetch overlaps the commit of the batch before it; batches still commit, and are
    # acknowledged, one after the other and in order.
    applying: asyncio.Task[bool] | None = None
    committed = reached  # what this consumer's batches committed: a database behind it lost commits
    try:
        while not halt.is_set():
            items = await _fetch(sub, BATCH, 0.5)
            if applying is not None:
                previous, applying = applying, None
                if not await previous:
                    return
            if items:
                applying = asyncio.create_task(_apply_and_ack(pool, items, halt, committed))
                committed = max(committed, items[-1].seq)
            else:
                await _still_stored(pool, committed)
    finally:
        if applying is not None:
            with contextlib.suppress(asyncio.CancelledError, deadletters.Rewound, *_PG_DOWN):
                await applying
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def _still_stored(pool: asyncpg.Pool, committed: int) -> None:
    """Idle (a fetch found nothing): raise ``Rewound`` if the database lost commits meanwhile (a
    PostgreSQL crash takes back the latest commits made without waiting for their fsync), so they
    are applied again now rather than once the next event comes. A busy projector learns it from
    its next batch's commit. One read per idle fetch."""
    async with pool.acquire() as conn:
        stored = await position(conn)
    if stored < committed:
        raise deadletters.Rewound(f"position {stored}, but {committed} was committed")


async def _fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Delivery]:
    """Up to ``batch`` messages; one that cannot be decoded comes as a ``Delivery`` without an
    event (to be dead-lettered in order, never dropped)."""
    try:
        msgs = await bus.fetch_msgs(sub, batch, timeout)
    except (TimeoutError, nats.errors.TimeoutError):
        return []
    return [deadletters.delivery(msg) for msg in msgs]


async def _apply_and_ack(pool: asyncpg.Pool, items: list[Delivery], halt: asyncio.Event, committed: int) -> bool:
    """Commit one fetched batch, then acknowledge it; False if halted before the database took it.

    Poison is parked in ``dead_letters`` within the commit; whatever else fails (PostgreSQL
    away, the connection lost) is retried, loudly, until the database takes the batch."""
    for attempt in itertools.count():
        try:
            dead = await deadletters.project(pool, items, committed)
            break
        except _PG_DOWN as exc:
            log.error("projection failed; retrying", first_seq=items[0].seq, attempt=attempt, error=repr(exc))
            await _pause(halt, min(30.0, 0.5 * 2**attempt))
            if halt.is_set():
                return False
    if dead:
        log.error("events parked in dead_letters", count=dead, first_seq=items[0].seq, last_seq=items[-1].seq)
    last = items[-1].msg
    if last is not None:
        with contextlib.suppress(nats.errors.Error):
            await last.ack()  # AckAll: acknowledges the whole batch, after the commit (lost: redelivered, skipped)
    metrics.applied([(d.msg, d.event) for d in items if d.event is not None])
    return True


async def rebuild(settings: Settings) -> tuple[int, int]:
    """Empty the read models and replay the EVENTS stream from sequence 1.

    One transaction holding the position row's lock for the whole replay, so a running projector
    waits and then carries on past the rebuild's position; readers see the old state until the
    commit. Returns (events replayed, position).
    """
    pool = await connect_db(settings)
    nc = await bus.connect(settings, "projector-rebuild", attempts=3)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js)
        async with pool.acquire() as conn:
            await ensure_schema(conn)
        sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE)
        replayed = 0
        async with pool.acquire() as conn, conn.transaction():
            await lock_position(conn)
            last = await bus.last_sequence(js)
            await conn.execute(f"TRUNCATE {', '.join(TABLES + BOOKKEEPING)}")
            reached, seen = 0, 0
            while seen < last:
                items = await _fetch(sub, 1024, 2.0)
                if not items:
                    break
                batch = [d for d in items if d.seq <= last]
                reached, _ = await deadletters.apply_quarantining(conn, batch, reached)
                replayed += len(batch)
                seen = items[-1].seq
            await conn.execute("UPDATE projection_position SET position = $2 WHERE name = $1", NAME, last)
            metrics.DEAD_LETTERS.set(await deadletters.count(conn))
        await sub.unsubscribe()
        return replayed, last
    finally:
        await nc.drain()
        await pool.close()
