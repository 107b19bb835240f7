"""Helpers for peer tests on a real nats-server: reading the event log, presence, running peers.

Events are read through ephemeral ordered JetStream consumers on the EVENTS stream; every wait is
for a message, with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from swarmtrain.common import bus, events
from swarmtrain.common.events import Event, PeerRegistered, Presence
from swarmtrain.common.settings import Settings
from swarmtrain.peer import service

E = TypeVar("E")


class EventReader:
    """Reads one subject filter of the EVENTS stream from its start, in order."""

    def __init__(self, sub: JetStreamContext.PushSubscription) -> None:
        self._sub = sub
        self.seen: list[Event] = []

    @classmethod
    async def open(cls, js: JetStreamContext, subject: str) -> EventReader:
        sub = await js.subscribe(
            subject, stream=bus.EVENTS_STREAM, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )
        return cls(sub)

    async def next(self, timeout: float) -> Event:
        msg = await self._sub.next_msg(timeout=timeout)
        event = events.decode_event(msg.data)
        self.seen.append(event)
        return event

    async def wait_for(self, kind: type[E], pred: Callable[[E], bool] = lambda e: True, timeout: float = 30) -> E:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {kind.__name__} within {timeout}s; saw {[type(e).__name__ for e in self.seen]}"
                )
            try:
                event = await self.next(timeout=left)
            except TimeoutError:
                continue
            if isinstance(event, kind) and pred(event):
                return event

    async def collect(
        self, kind: type[E], pred: Callable[[E], bool] = lambda e: True, count: int = 1, timeout: float = 30
    ) -> list[E]:
        """The first ``count`` events of ``kind`` matching ``pred``, whether already seen or still to come."""
        deadline = time.monotonic() + timeout
        while True:
            found: list[E] = [e for e in self.seen if isinstance(e, kind) and pred(e)]
            if len(found) >= count:
                return found[:count]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{len(found)} of {count} {kind.__name__} within {timeout}s; "
                    f"saw {[type(e).__name__ for e in self.seen]}"
                )
            with contextlib.suppress(TimeoutError):
                await self.next(timeout=left)

    async def close(self) -> None:
        await self._sub.unsubscribe()


class PresenceWatch:
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def wait_for(self, pred: Callable[[Presence], bool], timeout: float = 10) -> Presence:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await self._sub.next_msg(timeout=left)
            except TimeoutError:
                break
            beat = events.decode_presence(msg.data)
            if pred(beat):
                return beat
        raise AssertionError(f"no matching presence beat within {timeout}s")


@contextlib.asynccontextmanager
async def presence(nc: NATS, peer_id: str) -> AsyncIterator[PresenceWatch]:
    sub = await nc.subscribe(f"peer.{peer_id}.presence")
    try:
        yield PresenceWatch(sub)
    finally:
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def running_peer(settings: Settings, name: str = "alpha") -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(settings, stop, name=name, device="cpu"))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def reader(js: JetStreamContext, subject: str) -> AsyncIterator[EventReader]:
    r = await EventReader.open(js, subject)
    try:
        yield r
    finally:
        await r.close()


async def registered(js: JetStreamContext, name: str, after: int = 0) -> PeerRegistered:
    async with reader(js, "peer.*.events") as peers:
        seen = 0

        def nth(e: PeerRegistered) -> bool:
            nonlocal seen
            if e.name != name:
                return False
            seen += 1
            return seen > after

        return await peers.wait_for(PeerRegistered, nth)


async def stored_session_events(js: JetStreamContext, session_id: str) -> list[Event]:
    """Everything stored so far on the session's subject."""
    out: list[Event] = []
    last = (await js.stream_info(bus.EVENTS_STREAM)).state.last_seq
    sub = await js.subscribe(
        f"session.{session_id}.events", stream=bus.EVENTS_STREAM, ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL,
    )  # fmt: skip
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except TimeoutError:
                return out
            out.append(events.decode_event(msg.data))
            if msg.metadata.num_pending == 0 or msg.metadata.sequence.stream >= last:
                return out
    finally:
        await sub.unsubscribe()
