"""``swarmtrain session replay-round SESSION_ID ROUND``: recompute a fedavg round from the log.

Reads the session's events from JetStream, takes the updates that round's ``RoundClosed`` names,
fetches them from the blob store (checking each sha256), averages them exactly as the peers do, and
compares the result bit for bit with the average the peers stored (``RoundAveraged``).
"""

from __future__ import annotations

import asyncio
import hashlib

import msgspec
from nats.js import api

from swarmtrain.common import blob, bus, subjects
from swarmtrain.common.events import RoundAveraged, RoundClosed, RoundUpdate, decode_event
from swarmtrain.common.settings import Settings


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    round: int
    included: list[str]
    rejected: list[tuple[str, str]]
    recomputed_sha256: str
    stored_sha256: str
    stored_uri: str

    @property
    def matches(self) -> bool:
        return self.recomputed_sha256 == self.stored_sha256


async def read_round(settings: Settings, session_id: str, round_: int) -> tuple[RoundClosed, RoundAveraged]:
    nc = await bus.connect(settings, "replay-round", attempts=3)
    try:
        js = nc.jetstream()
        sub = await bus.pull_consumer(
            js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE, filter_subject=subjects.session_events(session_id)
        )
        closed: RoundClosed | None = None
        averaged: RoundAveraged | None = None
        try:
            while items := await bus.fetch(sub, decode_event, batch=1024, timeout=1.0):
                for _, event in items:
                    if isinstance(event, RoundClosed) and event.round == round_ and closed is None:
                        closed = event
                    elif isinstance(event, RoundAveraged) and event.round == round_ and averaged is None:
                        averaged = event
        finally:
            await sub.unsubscribe()
    finally:
        await nc.drain()
    if closed is None:
        raise ValueError(f"session {session_id} has no closed round {round_}")
    if averaged is None:
        raise ValueError(f"session {session_id}: round {round_} closed but no peer stored its average")
    return closed, averaged


def recompute(settings: Settings, closed: RoundClosed, averaged: RoundAveraged) -> ReplayResult:
    from safetensors.torch import load

    from swarmtrain.peer.averaging import average_round, state_bytes

    store, key = blob.resolve(averaged.uri, settings)
    stored = store.get_bytes(key, sha256=averaged.sha256)

    def fetch(update: RoundUpdate) -> bytes:
        s, k = blob.resolve(update.uri, settings)
        return s.get_bytes(k)

    rounds_uri = averaged.uri.rsplit(f"/{closed.round}/", 1)[0]  # exactly as the peers check update URIs
    average, rejected = average_round(closed, fetch, load(stored), rounds_uri=rounds_uri)
    if average is None:
        raise ValueError(f"round {closed.round}: every update was rejected: {rejected}")
    data = state_bytes(average)
    return ReplayResult(
        session_id=closed.session_id,
        round=closed.round,
        included=[u.peer_id for u in closed.updates if u.peer_id not in dict(rejected)],
        rejected=rejected,
        recomputed_sha256=hashlib.sha256(data).hexdigest(),
        stored_sha256=hashlib.sha256(stored).hexdigest(),
        stored_uri=averaged.uri,
    )


def replay_round(settings: Settings, session_id: str, round_: int) -> ReplayResult:
    closed, averaged = asyncio.run(read_round(settings, session_id, round_))
    return recompute(settings, closed, averaged)
