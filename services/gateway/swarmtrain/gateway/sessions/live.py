"""A session's live events as Server-Sent Events, each stream holding one of its user's leases."""

from __future__ import annotations

import weakref
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ClientException
from litestar.response import ServerSentEvent, ServerSentEventMessage

from swarmtrain.common.events import SessionEvent
from swarmtrain.gateway import eventlog
from swarmtrain.gateway.errors import TooManyRequests
from swarmtrain.gateway.inputs import printable
from swarmtrain.gateway.state import Gateway

KEEPALIVE_S = 15.0
RETRY_MS = 2000


class StreamLease:
    """One of a user's open live streams; released exactly once, however the stream ends (even if
    its body never started)."""

    def __init__(self, gw: Gateway, user_id: str) -> None:
        self._gw, self._user_id, self._held = gw, user_id, True
        gw.streams[user_id] += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gw.streams[self._user_id] -= 1
            if self._gw.streams[self._user_id] <= 0:
                del self._gw.streams[self._user_id]


def _message(seq: int, event: SessionEvent) -> ServerSentEventMessage:
    tag = type(event).__struct_config__.tag
    return ServerSentEventMessage(id=seq, event=str(tag), data=msgspec.json.encode(event).decode())


async def _events(gw: Gateway, session_id: str, after: int, lease: StreamLease) -> AsyncGenerator[Any, None]:
    try:
        yield ServerSentEventMessage(comment="swarmtrain session events", data=None, retry=RETRY_MS)
        async for item in eventlog.follow(gw.js, session_id, after, gw.draining, KEEPALIVE_S):
            yield ServerSentEventMessage(comment="keep-alive", data=None) if item is None else _message(*item)
    finally:
        lease.release()


def last_event_id(request: Request[Any, Any, Any]) -> int | None:
    """The ``Last-Event-ID`` header a reconnecting client sends: the last stream sequence it saw."""
    raw = request.headers.get("last-event-id")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise ClientException(f"Last-Event-ID must be an event's stream sequence, not {printable(raw)}")
    return int(raw)


def open_stream(gw: Gateway, user_id: str, session_id: str, after: int) -> ServerSentEvent:
    """The session's events past ``after``, then live ones; 429 past the user's open-stream cap."""
    cap = gw.settings.max_streams_per_user
    if gw.streams[user_id] >= cap:
        raise TooManyRequests(f"you have {gw.streams[user_id]} live streams open: at most {cap}")
    lease = StreamLease(gw, user_id)
    body = _events(gw, session_id, after, lease)
    weakref.finalize(body, lease.release)
    return ServerSentEvent(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
