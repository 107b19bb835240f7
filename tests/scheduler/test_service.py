"""The scheduler's shell against a real nats-server: malformed input, fake peers, two schedulers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy

from swarmtrain.common import bus
from swarmtrain.common.events import (
    Event,
    Hyperparameters,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    Presence,
    SessionRequested,
    SessionStarted,
    decode_event,
    encode,
)
from swarmtrain.common.settings import Settings
from swarmtrain.scheduler import service
from tests.factories import session_requested

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)


def request(sid: str, n: int) -> SessionRequested:
    return session_requested(sid, n)


@contextlib.asynccontextmanager
async def beating(nats_url: str, peer_ids: list[str]) -> AsyncIterator[None]:
    """Fake peers: registered, and beating presence until the block ends."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for p in peer_ids:
        await bus.append(js, PeerRegistered(peer_id=p, name=p, device="cpu"))

    async def beat() -> None:
        while True:
            for p in peer_ids:
                await nc.publish(f"peer.{p}.presence", encode(Presence(peer_id=p, name=p, device="cpu")))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nc.drain()


@contextlib.asynccontextmanager
async def schedulers(settings: Settings, n: int) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(settings, stop)) for _ in range(n)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def log(js: Any) -> list[Event]:
    sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=AckPolicy.NONE)
    out: list[Event] = []
    while batch := await bus.fetch(sub, decode_event, batch=1024, timeout=0.3):
        out += [e for _, e in batch]
    await sub.unsubscribe()
    return out


async def wait_started(js: Any, count: int, timeout: float = 20) -> list[Event]:
    async with asyncio.timeout(timeout):
        while True:
            events = await log(js)
            if len([e for e in events if isinstance(e, SessionStarted)]) >= count:
                return events
            await asyncio.sleep(0.1)


@pytest.fixture
def settings(nats_url: str, tmp_path: Any) -> Settings:  # no PostgreSQL needed here
    return Settings(nats_url=nats_url, blob_url=(tmp_path / "blobs").as_uri(), peer_timeout_s=5.0)


async def test_malformed_messages_at_the_end_of_the_log_do_not_stop_the_start(js: Any, settings: Settings) -> None:
    await js.publish("session.junk.events", b"\x00not json")
    await js.publish("peer.junk.events", b'{"type": "Nope"}')
    async with beating(settings.nats_url, ["pa", "pb"]), schedulers(settings, 1):
        await bus.append(js, request("s1", 2))
        await js.publish("session.s1.events", b"[]")  # more junk, live this time
        events = await wait_started(js, 1)
    [started] = [e for e in events if isinstance(e, SessionStarted)]
    assert sorted(started.assignments) == ["pa", "pb"]
    commands = await js.pull_subscribe("peer.pa.command", durable="t", stream=bus.COMMANDS_STREAM)
    [msg] = await commands.fetch(1, timeout=5)
    assert b'"type":"Train"' in msg.data and b'"session_id":"s1"' in msg.data
    await commands.unsubscribe()


async def test_two_schedulers_never_take_the_same_peer(js: Any, settings: Settings) -> None:
    peers = [f"p{i}" for i in range(6)]
    async with beating(settings.nats_url, peers), schedulers(settings, 2):
        for i in range(6):  # more demand than peers: sessions must queue, not share
            await bus.append(js, request(f"s{i}", 2))
        events = await wait_started(js, 3)
        await asyncio.sleep(1.0)  # give a wrongly eager second scheduler the chance to misbehave
        events = await log(js)
    holder: dict[str, str | None] = dict.fromkeys(peers)
    for e in events:
        if isinstance(e, PeerLocked):
            assert holder[e.peer_id] is None, f"{e.peer_id} locked for {e.session_id} while held by {holder[e.peer_id]}"
            holder[e.peer_id] = e.session_id
        elif isinstance(e, PeerReleased) and holder[e.peer_id] == e.session_id:
            holder[e.peer_id] = None
    started = [e for e in events if isinstance(e, SessionStarted)]
    assert len(started) == 3 and len({s.session_id for s in started}) == 3  # each started once
    assigned = [p for s in started for p in s.assignments]
    assert sorted(assigned) == peers  # six peers, each in exactly one session
