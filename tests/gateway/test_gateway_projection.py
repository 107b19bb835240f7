"""The projection watcher against a real PostgreSQL: LISTEN/NOTIFY, start position, reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from swarmtrain.gateway.projection import APPLICATION_NAME, CHANNEL, ProjectionWatcher
from tests.support import wait_for


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    await conn.execute("CREATE TABLE projection_position (name text PRIMARY KEY, position bigint NOT NULL)")
    await conn.execute("INSERT INTO projection_position VALUES ('main', 3)")
    yield conn
    await conn.close()


async def project(conn: asyncpg.Connection, position: int) -> None:
    """What the projector does at the end of each transaction."""
    async with conn.transaction():
        await conn.execute("UPDATE projection_position SET position = $1 WHERE name = 'main'", position)
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(position))


@pytest.fixture
async def watcher(database_url: str, db: asyncpg.Connection) -> AsyncIterator[ProjectionWatcher]:
    watcher = ProjectionWatcher(database_url, retry_s=0.1)
    await watcher.start()
    yield watcher
    await watcher.close()


async def test_starts_from_the_stored_position(watcher: ProjectionWatcher) -> None:
    assert await watcher.wait_for(3, max_wait_s=5)
    assert watcher.position == 3


async def test_wakes_on_notify_and_times_out_otherwise(watcher: ProjectionWatcher, db: asyncpg.Connection) -> None:
    assert await watcher.wait_for(3, max_wait_s=5)
    assert not await watcher.wait_for(4, max_wait_s=0.2)
    waiting = asyncio.create_task(watcher.wait_for(5, max_wait_s=5))
    await project(db, 4)
    # A negative window, not synchronisation: position 4 must not wake a wait for 5, and nothing
    # can be awaited for something that does not happen, so give it a moment to go wrong.
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await project(db, 5)
    assert await waiting


async def test_reconnects_and_rereads_the_position(watcher: ProjectionWatcher, db: asyncpg.Connection) -> None:
    assert await watcher.wait_for(3, max_wait_s=5)
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1"
        " AND datname = current_database()",
        APPLICATION_NAME,
    )
    assert killed == 1
    # While the watcher is away, the projector moves on without it hearing the NOTIFY.
    await db.execute("UPDATE projection_position SET position = 9 WHERE name = 'main'")
    assert await watcher.wait_for(9, max_wait_s=10)


async def test_a_position_taken_back_by_a_crash_is_believed_after_reconnecting(
    watcher: ProjectionWatcher, db: asyncpg.Connection
) -> None:
    """The projector commits without waiting for the fsync: a PostgreSQL crash may lose its latest
    commits, position included. After reconnecting the watcher believes the stored position, not
    the higher one it heard before the crash."""
    await project(db, 7)
    assert await watcher.wait_for(7, max_wait_s=5)
    await db.execute("UPDATE projection_position SET position = 5 WHERE name = 'main'")  # the crash's loss
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1"
        " AND datname = current_database()",
        APPLICATION_NAME,
    )
    assert killed == 1
    await wait_for(lambda: watcher.position == 5, "the watcher back at the stored position", timeout=10)
    assert not await watcher.wait_for(7, max_wait_s=0.2)
    await project(db, 7)  # applied again
    assert await watcher.wait_for(7, max_wait_s=5)


async def test_without_a_schema_it_waits_for_the_first_notify(database_url: str) -> None:
    watcher = ProjectionWatcher(database_url)
    await watcher.start()
    try:
        conn = await asyncpg.connect(database_url)
        try:
            waiting = asyncio.create_task(watcher.wait_for(1, max_wait_s=5))

            async def heard() -> bool:
                # Re-sent until heard: a NOTIFY sent before the watcher LISTENs is lost, not queued.
                await conn.execute("SELECT pg_notify($1, '1')", CHANNEL)
                return watcher.position >= 1

            await wait_for(heard, "the watcher to hear the first NOTIFY", timeout=5)
            assert await waiting
        finally:
            await conn.close()
    finally:
        await watcher.close()
