"""What every request handler shares: the event store, the read models, the blob store, and the
gateway's few in-memory, per-process structures (sign-in throttle, live-stream counts, locks)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
from litestar.datastructures import State
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from swarmtrain.common import bus
from swarmtrain.common.blob import BlobStore
from swarmtrain.common.events import Event
from swarmtrain.common.settings import Settings
from swarmtrain.gateway.passwords import Passwords
from swarmtrain.gateway.projection import ProjectionWatcher
from swarmtrain.gateway.throttle import SignInThrottle

PROJECTION_WAIT_S = 2.0


class KeyedLocks:
    """One ``asyncio.Lock`` per key while anyone holds or waits for it; forgotten after."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    nc: NATS
    js: JetStreamContext
    pool: asyncpg.Pool
    store: BlobStore
    projection: ProjectionWatcher
    passwords: Passwords
    throttle: SignInThrottle
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the gateway is shutting down: live event streams end."""
    streams: Counter[str] = field(default_factory=Counter)
    """Open live event streams per user."""
    session_locks: KeyedLocks = field(default_factory=KeyedLocks)
    """Serializes one user's session requests, so the active-session cap holds in this process."""

    async def append(self, event: Event, expected_last_subject_seq: int | None = None) -> int:
        """Append ``event``, then wait (briefly) until the read models include it.

        Returns the event's stream sequence. If the projector is slow, it returns anyway after
        ``PROJECTION_WAIT_S``: the event is stored, only the read-your-writes promise is missed.
        """
        seq = await bus.append(self.js, event, expected_last_subject_seq)
        await self.projection.wait_for(seq, max_wait_s=PROJECTION_WAIT_S)
        return seq


def provide_gateway(state: State) -> Gateway:
    gateway: Gateway = state.gateway
    return gateway
