"""Read-your-writes: wait until the projector has applied the event the gateway just appended.

The projector stores the stream sequence it reached in ``projection_position`` and announces it
with ``NOTIFY swarmtrain_projection, '<position>'`` in the same transaction. One dedicated
connection LISTENs on that channel (and reads the stored position when it (re)connects); requests
wait on an ``asyncio.Condition`` until the position reaches their event's sequence.

The projector commits without waiting for the fsync (``synchronous_commit = off``): a PostgreSQL
crash can take back its latest commits, position included, until it applies them again. So once
the watcher's connection is lost the position is unknown (0: a wait waits) until it reconnects and
reads the stored one, which may be lower than what it heard before.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from swarmtrain.common.logging import get_logger

CHANNEL = "swarmtrain_projection"
PROJECTION_NAME = "main"
APPLICATION_NAME = "swarmtrain-gateway-projection"
log = get_logger("swarmtrain.gateway.projection")


class ProjectionWatcher:
    """Tracks the projector's position; ``wait_for(seq)`` returns once it reaches ``seq``."""

    def __init__(self, dsn: str, *, retry_s: float = 0.5) -> None:
        self._dsn = dsn
        self._retry_s = retry_s
        self._position = 0
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def position(self) -> int:
        return self._position

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="projection-watcher")

    async def close(self) -> None:
        self._closing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_for(self, seq: int, max_wait_s: float = 2.0) -> bool:
        """True once the projection has reached ``seq``; False if ``max_wait_s`` ran out first."""
        if self._position >= seq:
            return True
        try:
            async with asyncio.timeout(max_wait_s), self._changed:
                await self._changed.wait_for(lambda: self._position >= seq)
        except TimeoutError:
            log.warning("projection lagging", wanted=seq, position=self._position)
            return False
        return True

    async def _advance(self, position: int) -> None:
        if position > self._position:
            async with self._changed:
                self._position = position
                self._changed.notify_all()

    async def _reset(self, position: int) -> None:
        """The position as the database stores it now (lower, after a crash took commits back)."""
        async with self._changed:
            self._position = position
            self._changed.notify_all()

    async def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            position = int(payload)
        except ValueError:
            log.warning("ignoring a malformed projection notice", payload=payload[:100])
            return
        await self._advance(position)

    async def _watch(self) -> None:
        while not self._closing.is_set():
            try:
                await self._listen_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
                log.warning("projection watcher reconnecting", error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._retry_s):
                    await self._closing.wait()

    async def _listen_once(self) -> None:
        lost = asyncio.Event()
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn, server_settings={"application_name": APPLICATION_NAME}
        )
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            # LISTEN before reading the stored position, so no NOTIFY falls between the two.
            await conn.add_listener(CHANNEL, self._on_notify)
            await self._reset(await _stored_position(conn))
            await lost.wait()
        finally:
            await self._reset(0)  # what a restarted server holds is read again on reconnecting
            if not conn.is_closed():
                with contextlib.suppress(OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError):
                    await conn.close(timeout=2)


async def _stored_position(conn: asyncpg.Connection) -> int:
    try:
        value = await conn.fetchval("SELECT position FROM projection_position WHERE name = $1", PROJECTION_NAME)
    except asyncpg.UndefinedTableError:  # the projector has not created its schema yet
        return 0
    return int(value or 0)
