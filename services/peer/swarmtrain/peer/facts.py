"""The facts of one session as the scheduler forwards them to a peer (``SessionFact`` commands).

A peer reads no session's events itself: the scheduler sends each assigned peer the facts it needs
(``RoundClosed``, ``UpdateRejected``, ``RoundAveraged``, ``ShardReassigned``, the session's end)
on its command subject, each with signed GET URLs of the objects it names. The peer's command
consumer feeds them in here (:meth:`SessionFacts.observe`, on the event loop); a job waits on them
(:meth:`SessionFacts.wait`).

The first ``RoundClosed`` (and ``RoundAveraged``) of a round is the one that counts: a fact is
immutable, so a re-forwarded copy changes nothing. URLs accumulate: a later copy of a fact may
carry fresher URLs for the same objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from swarmtrain.common.events import (
    TERMINAL_SESSION_EVENTS,
    RoundAveraged,
    RoundClosed,
    SessionEvent,
)
from swarmtrain.peer.trainer import TrainingStopped

T = TypeVar("T")


class SessionFacts:
    """What one job knows of its session, fed by the command consumer."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.closed: dict[int, RoundClosed] = {}
        self.averaged: dict[int, RoundAveraged] = {}
        self.ended: str | None = None
        """The name of the session's terminal fact, once forwarded."""
        self.urls: dict[str, str] = {}
        """Object uri -> signed GET URL, from every fact forwarded so far."""
        self._changed = asyncio.Event()

    def observe(self, fact: SessionEvent, urls: dict[str, str] | None = None) -> None:
        if fact.session_id != self.session_id:
            return
        self.urls.update(urls or {})
        match fact:
            case RoundClosed():
                self.closed.setdefault(fact.round, fact)
            case RoundAveraged():
                self.averaged.setdefault(fact.round, fact)
            case _ if isinstance(fact, TERMINAL_SESSION_EVENTS):
                self.ended = self.ended or type(fact).__name__
        self._changed.set()

    async def wait(self, ready: Callable[[], T | None], stopped: asyncio.Event) -> T:
        """Wait until ``ready()`` answers; ``TrainingStopped`` at once on ``stopped`` or the session's end."""
        while True:
            self._changed.clear()
            if stopped.is_set():
                raise TrainingStopped("stopped")
            if self.ended:
                raise TrainingStopped(f"the session ended ({self.ended})")
            value = ready()
            if value is not None:
                return value
            await _first_of(self._changed, stopped)


async def _first_of(*flags: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(flag.wait()) for flag in flags]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
