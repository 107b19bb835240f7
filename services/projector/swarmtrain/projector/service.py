"""The projector: the only writer of PostgreSQL. Consumes EVENTS, commits, then acknowledges."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import asyncpg
from nats.aio.msg import Msg
from nats.js import api

from swarmtrain.common import bus, metrics
from swarmtrain.common.events import Event, decode_event
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings
from swarmtrain.projector.projection import (
    NAME,
    TABLES,
    apply_batch,
    apply_in,
    ensure_schema,
    lock_position,
    position,
)

DURABLE = "projector"
log = get_logger("swarmtrain.projector")


async def connect_db(settings: Settings, attempts: int = 60) -> asyncpg.Pool:
    """A pool on the read-model database, retried while PostgreSQL is still starting."""
    for attempt in range(attempts):
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
            return pool
        except (OSError, asyncpg.CannotConnectNowError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def run(settings: Settings, stop: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pool = await connect_db(settings)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await ensure_schema(conn)
            reached = await position(conn)
        nc = await bus.connect(settings, "projector")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        sub = await bus.pull_consumer(
            js, bus.EVENTS_STREAM, durable=DURABLE, start_seq=reached + 1, ack=api.AckPolicy.ALL
        )
        stack.push_async_callback(sub.unsubscribe)
        log.info("projector started", position=reached)
        # The next fetch overlaps the commit of the batch before it; batches still commit, and
        # are acknowledged, one after the other and in order.
        applying: asyncio.Task[bool] | None = None
        try:
            while not stop.is_set():
                items = await bus.fetch(sub, decode_event, batch=512, timeout=0.5)
                if applying is not None:
                    previous, applying = applying, None
                    if not await previous:
                        return
                if items:
                    applying = asyncio.create_task(_apply_and_ack(pool, items, stop))
        finally:
            if applying is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await applying


async def _apply_and_ack(pool: asyncpg.Pool, items: list[tuple[Msg, Event]], stop: asyncio.Event) -> bool:
    """Commit one fetched batch, then acknowledge it; False if stopped before the database took it."""
    batch = [(bus.stream_seq(msg), event) for msg, event in items]
    for attempt in itertools.count():
        try:
            await apply_batch(pool, batch)
            break
        except (asyncpg.PostgresError, OSError) as exc:
            # never skip an event: retry the batch, loudly, until the database takes it
            log.error("projection failed; retrying", first_seq=batch[0][0], attempt=attempt, error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(30.0, 0.5 * 2**attempt))
            if stop.is_set():
                return False
    await items[-1][0].ack()  # AckAll: acknowledges the whole batch, after the commit
    metrics.applied(items)
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
            await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
            reached, seen = 0, 0
            while seen < last:
                items = await bus.fetch(sub, decode_event, batch=1024, timeout=2.0)
                if not items:
                    break
                batch = [(bus.stream_seq(msg), event) for msg, event in items if bus.stream_seq(msg) <= last]
                reached = await apply_in(conn, batch, reached)
                replayed += len(batch)
                seen = bus.stream_seq(items[-1][0])
            await conn.execute("UPDATE projection_position SET position = $2 WHERE name = $1", NAME, last)
        await sub.unsubscribe()
        return replayed, last
    finally:
        await nc.drain()
        await pool.close()
