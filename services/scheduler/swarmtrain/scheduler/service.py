"""The scheduler's shell: replays the log into state, then reads events and presence, and carries
out what ``state.decide`` returns. Several schedulers may run: peer locks and session starts are
compare-and-set appends, so two of them can never take the same peer or start a session twice."""

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
from swarmtrain.common.events import (
    PRESENCE_SUBJECTS,
    Event,
    Hyperparameters,
    PeerLocked,
    PeerReleased,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    Train,
    decode_event,
    decode_presence,
    new_id,
)
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings
from swarmtrain.scheduler.state import (
    Action,
    Append,
    Reassign,
    Send,
    Session,
    Start,
    State,
    Timing,
    decide,
    evolve,
    observe_presence,
    stale_locks,
)

log = get_logger("swarmtrain.scheduler")
TICK_S = 0.2


def train_command(
    req: SessionRequested,
    peer_id: str,
    hyperparameters: Hyperparameters,
    store: blob.BlobStore,
    shard: int = 0,
    start_round: int = 1,
) -> Train:
    return Train(
        event_id=f"{req.session_id}.{peer_id}.train.{start_round}",
        peer_id=peer_id,
        session_id=req.session_id,
        dataset_uri=req.dataset_uri,
        dataset_sha256=req.dataset_sha256,
        label_column=req.label_column,
        model=req.model,
        hyperparameters=hyperparameters,
        validation_split=req.validation_split,
        seed=req.seed,
        output_uri=store.uri(f"sessions/{req.session_id}/models/{peer_id}.safetensors"),
        strategy=req.strategy,
        shard=shard,
        num_shards=req.num_peers,
        rounds=req.rounds,
        start_round=start_round,
        rounds_uri=store.uri(f"sessions/{req.session_id}/rounds"),
    )


class Scheduler:
    def __init__(self, settings: Settings, js: JetStreamContext) -> None:
        self.settings = settings
        self.js = js
        self.store = blob.open_store(settings.blob_url)
        self.state = State(started_at=time.monotonic())
        self.timing = Timing(
            peer_timeout=settings.peer_timeout_s,
            first_round_timeout=settings.round_timeout_s,
            round_factor=settings.round_factor,
            round_min=settings.round_min_s,
        )
        self.barrier = 0
        """Stream sequence of our own latest write: no decision until the state has seen it."""

    def on_presence(self, data: bytes) -> None:
        try:
            presence = decode_presence(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("malformed presence beat ignored", error=str(exc))
            return
        observe_presence(self.state, presence, time.monotonic())

    async def catch_up(self, sub: JetStreamContext.PullSubscription) -> None:
        """Replay the log up to its current end, then undo what a dead scheduler left half done."""
        target = await bus.last_sequence(self.js)
        while self.state.position < target:
            if not await self.read(sub, timeout=2.0):
                break  # what is left is malformed: terminated, never evolved
        log.info("state rebuilt", position=self.state.position, sessions=len(self.state.sessions))
        for session in self.state.sessions.values():
            if session.status != "running":
                continue
            for peer_id, run in session.runs.items():
                if run.status == "training" and run.epoch == 0:  # may never have got its Train
                    start_round = max(1, session.round)
                    command = train_command(
                        session.request, peer_id, run.hyperparameters, self.store, run.shard, start_round
                    )
                    await bus.send(self.js, command)
        await self.execute(stale_locks(self.state))

    async def read(self, sub: JetStreamContext.PullSubscription, timeout: float) -> int:
        """Evolve the state with what arrives within ``timeout``; returns how many events came."""
        batch = await bus.fetch(sub, decode_event, batch=512, timeout=timeout)
        for msg, event in batch:
            evolve(self.state, bus.stream_seq(msg), event)
        return len(batch)

    async def step(self) -> None:
        if self.state.position >= self.barrier:
            with metrics.deciding():
                actions = decide(self.state, time.monotonic(), time.time(), self.timing)
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
                        self.barrier = max(self.barrier, await bus.append(self.js, event))
                        log.info("appended", type=type(event).__name__, subject=event.subject)
                    case Send(command=command):
                        await bus.send(self.js, command)
                    case Start(session_id=session_id, peer_ids=peer_ids):
                        await self.start(self.state.sessions[session_id], peer_ids)
                    case Reassign():
                        await self.reassign(action)
            except Exception as exc:
                log.warning("action failed; will retry", action=repr(action)[:200], error=repr(exc))

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

    async def start(self, session: Session, peer_ids: tuple[str, ...]) -> None:
        """Lock every peer (all at once), start the session, send the Trains (all at once)."""
        sid = session.request.session_id

        async def lock(peer_id: str) -> int:
            return await self.cas_append(PeerLocked(peer_id=peer_id, session_id=sid), self.state.peers[peer_id].seq)

        results = await asyncio.gather(*(lock(p) for p in peer_ids), return_exceptions=True)
        locked = [p for p, r in zip(peer_ids, results, strict=True) if isinstance(r, int)]
        self.barrier = max([self.barrier, *(r for r in results if isinstance(r, int))])
        failed = [r for r in results if not isinstance(r, int)]
        assignments = dict(zip(peer_ids, session.request.hyperparameters, strict=True))
        shards = {p: i for i, p in enumerate(peer_ids)} if session.fedavg else {}
        try:
            if failed:
                raise failed[0]
            started = SessionStarted(event_id=f"{sid}.started", session_id=sid, assignments=assignments, shards=shards)
            self.barrier = max(self.barrier, await self.cas_append(started, session.seq))
        except bus.WrongLastSequence as exc:
            log.info("start lost a race; releasing and retrying", session_id=sid, subject=str(exc))
            released = await asyncio.gather(
                *(bus.append(self.js, PeerReleased(peer_id=p, session_id=sid)) for p in locked)
            )
            self.barrier = max([self.barrier, *released])
            return
        await asyncio.gather(
            *(
                bus.send(self.js, train_command(session.request, p, hp, self.store, shards.get(p, 0)))
                for p, hp in assignments.items()
            )
        )
        log.info("session started", session_id=sid, peers=list(peer_ids))

    async def reassign(self, action: Reassign) -> None:
        session = self.state.sessions[action.session_id]
        sid, peer_id = action.session_id, action.peer_id
        try:
            seq = await self.cas_append(PeerLocked(peer_id=peer_id, session_id=sid), self.state.peers[peer_id].seq)
        except bus.WrongLastSequence:
            return  # the peer moved on; the next decision picks again
        self.barrier = max(self.barrier, seq)
        moved = ShardReassigned(
            session_id=sid, shard=action.shard, from_peer_id=action.from_peer_id, to_peer_id=peer_id, round=action.round
        )
        self.barrier = max(self.barrier, await bus.append(self.js, moved))
        hyperparameters = session.request.hyperparameters[action.shard]
        command = train_command(session.request, peer_id, hyperparameters, self.store, action.shard, action.round)
        await bus.send(self.js, msgspec.structs.replace(command, event_id=new_id()))  # each hand-over is new
        log.info("shard reassigned", session_id=sid, shard=action.shard, peer_id=peer_id, round=action.round)


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
