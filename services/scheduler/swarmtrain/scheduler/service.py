"""The scheduler's shell: replays the log into state (``state.fold``), then reads events and
presence and publishes what ``decide.decide`` returns; it decides nothing itself. Its own mechanics
are the compare-and-set appends (several schedulers may run: peer locks and session starts are
compare-and-set, so two of them can never take the same peer or start a session twice) and
releasing what a start that lost such a race had locked."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from swarmtrain.common import blob, bus, metrics
from swarmtrain.common.events import PRESENCE_SUBJECTS, Event, decode_event, decode_presence
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings
from swarmtrain.scheduler.actions import Action, Append, Clocks, Config, Reassign, Send, Start, Timing, release
from swarmtrain.scheduler.decide import decide, recover
from swarmtrain.scheduler.state import State, fold, observe_beats

log = get_logger("swarmtrain.scheduler")
TICK_S = 0.2


def clocks() -> Clocks:
    return Clocks(now=time.monotonic(), wall=time.time())


def observed_at(msg: Msg) -> float:
    """When the broker stored the message (UTC seconds): the same on every replay and every
    scheduler, and never a peer's own clock."""
    return msg.metadata.timestamp.timestamp()


class Scheduler:
    def __init__(self, settings: Settings, js: JetStreamContext) -> None:
        self.settings = settings
        self.js = js
        self.state = State(started_at=time.monotonic())
        timing = Timing(
            peer_timeout=settings.peer_timeout_s,
            first_round_timeout=settings.round_timeout_s,
            round_factor=settings.round_factor,
            round_min=settings.round_min_s,
        )
        self.config = Config(uri=blob.open_store(settings.blob_url).uri, timing=timing)
        self.beats: dict[str, float] = {}
        """Presence beats since the last decision: folded in, all at once, before the next."""
        self.barrier = 0
        """Stream sequence of our own latest write: no decision until the state has seen it."""

    def on_presence(self, data: bytes) -> None:
        try:
            presence = decode_presence(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("malformed presence beat ignored", error=str(exc))
            return
        self.beats[presence.peer_id] = time.monotonic()

    async def catch_up(self, sub: JetStreamContext.PullSubscription) -> None:
        """Replay the log up to its current end, then redo what a dead scheduler may have left half done."""
        target = await bus.last_sequence(self.js)
        while self.state.position < target:
            if not await self.read(sub, timeout=2.0):
                break  # what is left is malformed: terminated, never evolved
        log.info("state rebuilt", position=self.state.position, sessions=len(self.state.sessions))
        await self.execute(recover(self.state, clocks(), self.config))

    async def read(self, sub: JetStreamContext.PullSubscription, timeout: float) -> int:
        """Fold in what arrives within ``timeout``; returns how many events came."""
        batch = await bus.fetch(sub, decode_event, batch=512, timeout=timeout)
        if batch:
            self.state = fold(self.state, [(bus.stream_seq(msg), event, observed_at(msg)) for msg, event in batch])
        return len(batch)

    async def step(self) -> None:
        beats, self.beats = self.beats, {}
        self.state = observe_beats(self.state, beats)
        if self.state.position >= self.barrier:
            with metrics.deciding():
                actions = decide(self.state, clocks(), self.config)
            await self.execute(actions)

    async def execute(self, actions: Sequence[Action]) -> None:
        starts = [a for a in actions if isinstance(a, Start)]  # disjoint peers: run side by side
        if len(starts) > 1:
            others = [a for a in actions if not isinstance(a, Start)]
            await self.execute(others)
            await asyncio.gather(*(self.execute([a]) for a in starts))
            return
        for action in actions:
            try:
                match action:
                    case Append(event=event):
                        await self.append(event)
                        log.info("appended", type=type(event).__name__, subject=event.subject)
                    case Send(command=command):
                        await bus.send(self.js, command)
                    case Start():
                        await self.start(action)
                    case Reassign():
                        await self.reassign(action)
            except Exception as exc:
                log.warning("action failed; will retry", action=repr(action)[:200], error=repr(exc))

    async def append(self, event: Event, expected: int | None = None) -> int:
        """Append ``event`` (a compare-and-set with ``expected``); the next decision waits until it is read back."""
        seq = await (bus.append(self.js, event) if expected is None else self.cas_append(event, expected))
        self.barrier = max(self.barrier, seq)
        return seq

    async def cas_append(self, event: Event, expected: int) -> int:
        """Append ``event`` if its subject is still at ``expected``.

        A malformed message that landed on the subject since (anyone allowed to publish there can
        put junk on it) does not count as a competing write: the append is retried past it.
        """
        for _ in range(5):
            try:
                return await bus.append(self.js, event, expected_last_subject_seq=expected)
            except bus.WrongLastSequence:
                last = await self.js.get_last_msg(bus.EVENTS_STREAM, event.subject)
                try:
                    decode_event(last.data or b"")
                except (msgspec.DecodeError, msgspec.ValidationError):
                    expected = int(last.seq or 0)
                    continue
                raise
        raise bus.WrongLastSequence(event.subject)

    async def start(self, action: Start) -> None:
        """Lock every peer (all at once), start the session, send the Trains (all at once)."""
        sid = action.session_id
        results = await asyncio.gather(
            *(self.append(lock.event, lock.expected) for lock in action.locks), return_exceptions=True
        )
        locked = [(lock.event.peer_id, r) for lock, r in zip(action.locks, results, strict=True) if isinstance(r, int)]
        failed = [r for r in results if not isinstance(r, int)]
        try:
            if failed:
                raise failed[0]
            await self.append(action.started, action.expected)
        except bus.WrongLastSequence as exc:
            log.info("start lost a race; releasing and retrying", session_id=sid, subject=str(exc))
            now = clocks()
            await asyncio.gather(*(self.append(release(sid, p, seq, now)) for p, seq in locked))
            return
        await asyncio.gather(*(bus.send(self.js, train) for train in action.trains))
        log.info("session started", session_id=sid, peers=list(action.peer_ids))

    async def reassign(self, action: Reassign) -> None:
        try:
            await self.append(action.lock.event, action.lock.expected)
        except bus.WrongLastSequence:
            return  # the peer moved on; the next decision picks again
        await self.append(action.moved)
        await bus.send(self.js, action.train)
        moved = action.moved
        log.info("shard reassigned", session_id=moved.session_id, shard=moved.shard, peer_id=moved.to_peer_id)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nc = await bus.connect(settings, "scheduler")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        scheduler = Scheduler(settings, js)

        async def on_presence(msg: Msg) -> None:
            scheduler.on_presence(msg.data)

        presence = await nc.subscribe(PRESENCE_SUBJECTS, cb=on_presence)
        stack.push_async_callback(presence.unsubscribe)
        sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE)
        stack.push_async_callback(sub.unsubscribe)
        structlog.contextvars.bind_contextvars(service="scheduler")
        await scheduler.catch_up(sub)
        while not stop.is_set():
            await scheduler.read(sub, timeout=TICK_S)
            await scheduler.step()
