"""One session's events read straight from the log (``session.<id>.events`` in the EVENTS stream).

Both readers use an ephemeral pull consumer filtered to the session's subject, starting at a
stream sequence, with no acks: the server hands the messages over in order, exactly once. The
follower keeps the last sequence it passed on and, should its consumer vanish (a server restart,
an inactivity reap), makes a new one from the next sequence, so it neither skips nor repeats an
event (an ordered consumer, done explicitly: nats-py's push-based one leaves its heartbeat and
flow-control tasks running, and recreating its consumer, after an unsubscribe). Consumers are
deleted when the reader is done, whether it finished, failed or was cancelled (a client that hung
up), and the server reaps any that is left after ``INACTIVE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing
from collections.abc import AsyncIterator

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from swarmtrain.common import bus, subjects
from swarmtrain.common.events import TERMINAL_SESSION_EVENTS, SessionEvent, decode_event
from swarmtrain.common.logging import get_logger

INACTIVE_S = 30.0
POLL_S = 1.0
BATCH = 256
SESSION_EVENT_TYPES: tuple[type, ...] = typing.get_args(SessionEvent)
log = get_logger("swarmtrain.gateway.eventlog")


session_subject = subjects.session_events


class _Reader:
    def __init__(self, js: JetStreamContext, subject: str) -> None:
        self.js = js
        self.subject = subject
        self.sub: JetStreamContext.PullSubscription | None = None
        self.consumer: str | None = None

    async def open(self, start_seq: int) -> int:
        """(Re)start at ``start_seq``; returns how many of the subject's messages lie ahead."""
        await self.close()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start_seq),
            ack_policy=api.AckPolicy.NONE,
            filter_subject=self.subject,
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        info = await self.js.add_consumer(bus.EVENTS_STREAM, config)
        self.consumer = info.name
        self.sub = await self.js.pull_subscribe_bind(consumer=info.name, stream=bus.EVENTS_STREAM)
        return int(info.num_pending or 0)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        assert self.sub is not None
        try:
            return await self.sub.fetch(batch, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []

    async def close(self) -> None:
        """Unsubscribe and delete the consumer; shielded, so a cancelled reader still cleans up."""
        sub, consumer, self.sub, self.consumer = self.sub, self.consumer, None, None
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            if consumer is not None:
                with contextlib.suppress(nats.errors.Error):
                    await self.js.delete_consumer(bus.EVENTS_STREAM, consumer)


def _decode(msg: Msg, session_id: str) -> SessionEvent | None:
    """The session event in ``msg``, or None (logged) for anything else found on the subject."""
    try:
        event = decode_event(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("skipping a malformed event", subject=msg.subject, error=str(exc))
        return None
    if not isinstance(event, SESSION_EVENT_TYPES) or getattr(event, "session_id", None) != session_id:
        log.warning("skipping a stray event", subject=msg.subject, type=type(event).__name__)
        return None
    return typing.cast(SessionEvent, event)


async def page(
    js: JetStreamContext, session_id: str, after: int, limit: int
) -> tuple[list[tuple[int, SessionEvent]], int, bool]:
    """Up to ``limit`` of the session's events past stream sequence ``after``.

    Returns the events with their sequences, the last sequence read (``after`` if none) and
    whether more follow it.
    """
    reader = _Reader(js, session_subject(session_id))
    events: list[tuple[int, SessionEvent]] = []
    last = after
    try:
        pending = await reader.open(after + 1)
        want = min(limit, pending)
        read = 0
        while read < want:
            msgs = await reader.fetch(want - read, timeout=2.0)
            if not msgs:
                break
            for msg in msgs:
                read += 1
                last = bus.stream_seq(msg)
                if (event := _decode(msg, session_id)) is not None:
                    events.append((last, event))
    finally:
        await reader.close()
    return events, last, pending > read


async def follow(
    js: JetStreamContext, session_id: str, after: int, stop: asyncio.Event | None = None, keepalive_s: float = 15.0
) -> AsyncIterator[tuple[int, SessionEvent] | None]:
    """The session's events past ``after``, then live ones, until a terminal session event.

    Yields ``(seq, event)``, or ``None`` after ``keepalive_s`` without any (for a keep-alive);
    returns after the terminal event, or once ``stop`` is set.
    """
    reader = _Reader(js, session_subject(session_id))
    last, idle = after, 0.0
    try:
        await reader.open(last + 1)
        while stop is None or not stop.is_set():
            try:
                msgs = await reader.fetch(BATCH, timeout=POLL_S)
            except nats.errors.Error as exc:  # the consumer is gone: go on from where we are
                log.info("event follower resuming", session_id=session_id, after=last, error=repr(exc))
                await reader.open(last + 1)
                continue
            if not msgs:
                idle += POLL_S
                if idle >= keepalive_s:
                    idle = 0.0
                    yield None
                continue
            idle = 0.0
            for msg in msgs:
                seq = bus.stream_seq(msg)
                if seq <= last:
                    continue
                last = seq
                if (event := _decode(msg, session_id)) is None:
                    continue
                yield seq, event
                if isinstance(event, TERMINAL_SESSION_EVENTS):
                    return
    finally:
        await reader.close()
