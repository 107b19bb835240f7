"""Helpers for peer tests on a real nats-server: reading reports, presence, running peers, and
playing the scheduler's part (signed URLs, ``Train`` and ``SessionFact`` commands).

Reports are read through ephemeral ordered JetStream consumers on the REPORTS stream; every wait is
for a message, with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from swarmtrain.common import bus, events, subjects
from swarmtrain.common.blob import FileStore
from swarmtrain.common.events import (
    PeerRegistered,
    Presence,
    Report,
    RoundAveraged,
    RoundClosed,
    SessionEvent,
    SessionFact,
    UpdateRejected,
)
from swarmtrain.common.settings import Settings
from swarmtrain.common.signing import UrlSigner
from swarmtrain.peer import service

E = TypeVar("E")


class ReportReader:
    """Reads the REPORTS stream (every peer's ``peer.<id>.reports``) from its start, in order; with
    ``session_id``, only that session's reports."""

    def __init__(self, sub: JetStreamContext.PushSubscription, session_id: str | None) -> None:
        self._sub = sub
        self._session_id = session_id
        self.seen: list[Report] = []

    @classmethod
    async def open(cls, js: JetStreamContext, session_id: str | None = None) -> ReportReader:
        sub = await js.subscribe(
            subjects.PEER_REPORTS, stream=bus.REPORTS_STREAM, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )  # fmt: skip
        return cls(sub, session_id)

    async def next(self, timeout: float) -> Report | None:
        """The next report (None if it is of another session)."""
        msg = await self._sub.next_msg(timeout=timeout)
        report = events.decode_report(msg.data)
        speaker = report.reported_by if isinstance(report, UpdateRejected) else report.peer_id
        assert msg.subject == subjects.peer_reports(speaker), "a report on another peer's subject"
        if self._session_id is not None and getattr(report, "session_id", None) != self._session_id:
            return None
        self.seen.append(report)
        return report

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
async def running_peer(
    settings: Settings, name: str = "alpha", labels: dict[str, str] | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(settings, stop, name=name, device="cpu", labels=labels))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def reports(js: JetStreamContext, session_id: str | None = None) -> AsyncIterator[ReportReader]:
    r = await ReportReader.open(js, session_id)
    try:
        yield r
    finally:
        await r.close()


async def registered(js: JetStreamContext, name: str, after: int = 0) -> PeerRegistered:
    async with reports(js) as peers:
        seen = 0

        def nth(e: PeerRegistered) -> bool:
            nonlocal seen
            if e.name != name:
                return False
            seen += 1
            return seen > after

        return await peers.wait_for(PeerRegistered, nth)


async def stored_reports(js: JetStreamContext, session_id: str) -> list[Report]:
    """Every report of the session stored so far."""
    out: list[Report] = []
    last = (await js.stream_info(bus.REPORTS_STREAM)).state.last_seq
    if last == 0:
        return out
    sub = await js.subscribe(
        subjects.PEER_REPORTS, stream=bus.REPORTS_STREAM, ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL,
    )  # fmt: skip
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            report = events.decode_report(msg.data)
            if getattr(report, "session_id", None) == session_id:
                out.append(report)
            if msg.metadata.sequence.stream >= last:
                return out
    finally:
        await sub.unsubscribe()


async def events_stored(js: JetStreamContext) -> int:
    """How many messages the EVENTS stream holds: a peer never writes there."""
    return int((await js.stream_info(bus.EVENTS_STREAM)).state.messages)


class SchedulerPart:
    """What the scheduler does for a peer, played by a test: signs the URLs a ``Train`` carries and
    forwards facts as ``SessionFact`` commands with signed GETs of the objects they name."""

    def __init__(self, js: JetStreamContext, signer: UrlSigner, blob_dir: Path) -> None:
        self.js = js
        self.signer = signer
        self.store = FileStore(blob_dir)

    def key(self, uri: str) -> str:
        return self.store.key_of(uri)

    def get(self, uri: str) -> str:
        return self.signer.get_url(self.key(uri))

    def put(self, uri: str, max_bytes: int = 64 << 20) -> str:
        return self.signer.put_url(self.key(uri), max_bytes)

    def sign(self, train: events.Train) -> events.Train:
        """``train`` with its signed URLs, as the scheduler sends it."""
        import msgspec

        rounds = range(train.start_round, train.rounds + 1) if train.rounds_uri else range(0)
        base = train.rounds_uri.rstrip("/")
        return msgspec.structs.replace(
            train,
            dataset_url=self.get(train.dataset_uri),
            output_url=self.put(train.output_uri),
            update_urls={r: self.put(f"{base}/{r}/{train.peer_id}.safetensors") for r in rounds},
            average_urls={r: self.put(f"{base}/{r}/average.safetensors") for r in rounds},
        )

    async def train(self, train: events.Train) -> events.Train:
        signed = self.sign(train)
        await bus.send(self.js, signed)
        return signed

    def urls_of(self, fact: SessionEvent) -> dict[str, str]:
        """Signed GETs of the objects ``fact`` names that lie in the store."""
        match fact:
            case RoundClosed():
                uris = [u.uri for u in fact.updates]
            case RoundAveraged():
                uris = [fact.uri]
            case _:
                uris = []
        out = {}
        for uri in uris:
            with contextlib.suppress(ValueError):
                out[uri] = self.get(uri)
        return out

    async def forward(self, peer_ids: list[str], fact: SessionEvent, urls: dict[str, str] | None = None) -> None:
        """``fact`` to each peer as a ``SessionFact`` (``urls``: as given, else every object it names)."""
        signed = self.urls_of(fact) if urls is None else urls
        for peer_id in peer_ids:
            await bus.send(
                self.js,
                SessionFact(
                    event_id=f"{fact.event_id}.to.{peer_id}", peer_id=peer_id, session_id=fact.session_id,
                    fact=fact, urls=signed,
                ),
            )  # fmt: skip
