"""The whole suite's one way to wait for a condition and one fake-peer presence beater.

- :func:`wait_for` polls a check (plain or async) until it answers, with a bound and a message;
  prefer waiting on a message or an event where there is one, and poll only what has none to wait
  on (a REST read model, a server's error callback list, a consumer's state).
- :func:`beating` makes peers look alive to a scheduler: their ``Presence`` beats, as a running
  peer sends them, until the block ends (and stops at once when it does).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Literal, TypeVar, overload

from nats.aio.client import Client as NATS

from swarmtrain.common import events, subjects
from swarmtrain.common.events import Presence

T = TypeVar("T")
Falsy = Literal[False] | None


@overload
async def wait_for(
    check: Callable[[], Awaitable[T | Falsy]], what: str, *, timeout: float = 10.0, interval: float = 0.05
) -> T: ...


@overload
async def wait_for(
    check: Callable[[], T | Falsy], what: str, *, timeout: float = 10.0, interval: float = 0.05
) -> T: ...


async def wait_for(check: Callable[[], object], what: str, *, timeout: float = 10.0, interval: float = 0.05) -> object:
    """``check()``'s first truthy answer (awaited when it is a coroutine), asked every ``interval``
    seconds; ``AssertionError("timed out after <timeout>s waiting for <what>")`` when none comes.

    An exception from ``check`` (an assertion that the system is broken) ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if inspect.isawaitable(answer):
            answer = await answer
        if answer:
            return answer
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)  # the polling interval; the condition itself is what is awaited


@contextlib.asynccontextmanager
async def beating(
    nc: NATS, peer_ids: Iterable[str], every_s: float = 0.1, *, device: str = "cpu"
) -> AsyncIterator[None]:
    """Presence beats for ``peer_ids`` (named after their ids) every ``every_s`` until the block ends.

    The first round of beats is published before the block's body runs.
    """
    beats = [(subjects.peer_presence(p), events.encode(Presence(peer_id=p, name=p, device=device))) for p in peer_ids]
    stop = asyncio.Event()

    async def beat_once() -> None:
        for subject, data in beats:
            await nc.publish(subject, data)

    async def beat() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)  # the beat's period; returns at once on stop
            if not stop.is_set():
                await beat_once()

    await beat_once()
    task = asyncio.create_task(beat(), name="fake-presence")
    try:
        yield
    finally:
        stop.set()
        await task


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once the kernel shows it stopped: the signal is delivered
    asynchronously, so a request sent right after ``kill`` may still be served."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
        if time.monotonic() >= deadline:
            raise AssertionError(f"process {pid} did not stop within {timeout}s")
        time.sleep(0.001)  # the kernel's state is polled: there is nothing to wait on
