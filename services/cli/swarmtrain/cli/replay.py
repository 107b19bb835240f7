"""``swarmtrain sessions replay-round SESSION_ID ROUND``: recompute a fedavg round from the log.

Reads the session's events from JetStream: its ``SessionRequested`` (the round rules: aggregator,
outer optimizer, compression, norm bound), every ``RoundClosed`` and the ``RoundAveraged`` the
peers stored. It fetches the updates a round's ``RoundClosed`` names from the blob store (checking
each sha256) and applies the round exactly as the peers do (``training.rounds.apply_round``), then
compares the result bit for bit with the model the peers stored, and the rule, the selection and
the bytes with what their ``RoundAveraged`` says.

Where a round's result does not depend on the weights it started from (no compression, no norm
bound, no outer optimizer) the round is recomputed alone. Otherwise the replay starts from the
session's initial weights (rebuilt from the dataset, as the peers build them) and walks every round
up to ``ROUND``, carrying the outer optimizer's state as a newcomer does; a round on the way whose
result differs from the stored one is reported.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import msgspec
from nats.js import api
from safetensors.torch import load

from swarmtrain.common import blob, blobkeys, bus, subjects
from swarmtrain.common.events import (
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionEvent,
    SessionRequested,
    decode_event,
)
from swarmtrain.common.settings import Settings
from swarmtrain.training.averaging import sha256_hex, state_bytes
from swarmtrain.training.evaluation import load_dataset
from swarmtrain.training.init import initial_weights
from swarmtrain.training.rounds import RoundOptions, RoundResult, apply_round, replay_rounds


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    round: int
    included: list[str]
    rejected: list[tuple[str, str]]
    recomputed_sha256: str
    stored_sha256: str
    stored_uri: str
    aggregator: str = "mean"
    """The rule the replay applied."""
    selected: list[str] = msgspec.field(default_factory=list)
    update_bytes: int = 0
    stored_aggregator: str = "mean"
    stored_selected: list[str] = msgspec.field(default_factory=list)
    stored_update_bytes: int = 0
    earlier_mismatches: list[int] = msgspec.field(default_factory=list)
    """Rounds before ``round`` whose recomputed model differs from the stored one (walks only)."""

    @property
    def facts_match(self) -> bool:
        """The rule, the selection and the bytes agree with the stored ``RoundAveraged`` (the latter
        two only where it records them: events from before they were kept hold their defaults)."""
        return (
            self.aggregator == self.stored_aggregator
            and (not self.stored_selected or self.selected == self.stored_selected)
            and (not self.stored_update_bytes or self.update_bytes == self.stored_update_bytes)
        )

    @property
    def matches(self) -> bool:
        return self.recomputed_sha256 == self.stored_sha256 and self.facts_match and not self.earlier_mismatches


class SessionLog(msgspec.Struct, frozen=True, kw_only=True):
    request: SessionRequested
    closed: dict[int, RoundClosed]
    averaged: dict[int, RoundAveraged]


async def read_session(settings: Settings, session_id: str, name: str = "replay-round") -> list[SessionEvent]:
    """The session's events, in log order."""
    nc = await bus.connect(settings, name, attempts=3)
    out: list[SessionEvent] = []
    try:
        js = nc.jetstream()
        sub = await bus.pull_consumer(
            js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE, filter_subject=subjects.session_events(session_id)
        )
        try:
            while items := await bus.fetch(sub, decode_event, batch=1024, timeout=1.0):
                out += [e for _, e in items if getattr(e, "session_id", None) == session_id]  # type: ignore[misc]
        finally:
            await sub.unsubscribe()
    finally:
        await nc.drain()
    return out


async def read_log(settings: Settings, session_id: str) -> SessionLog:
    """The session's request, closed rounds and first stored average of each round."""
    request: SessionRequested | None = None
    closed: dict[int, RoundClosed] = {}
    averaged: dict[int, RoundAveraged] = {}
    for event in await read_session(settings, session_id):
        if isinstance(event, SessionRequested) and request is None:
            request = event
        elif isinstance(event, RoundClosed):
            closed.setdefault(event.round, event)
        elif isinstance(event, RoundAveraged):
            averaged.setdefault(event.round, event)
    if request is None:
        raise ValueError(f"session {session_id} has no SessionRequested in the log")
    return SessionLog(request=request, closed=closed, averaged=averaged)


async def read_round(settings: Settings, session_id: str, round_: int) -> tuple[RoundClosed, RoundAveraged]:
    """Round ``round_``'s ``RoundClosed`` and stored ``RoundAveraged``."""
    found = await read_log(settings, session_id)
    return _round_of(found, session_id, round_)


def _round_of(found: SessionLog, session_id: str, round_: int) -> tuple[RoundClosed, RoundAveraged]:
    closed, averaged = found.closed.get(round_), found.averaged.get(round_)
    if closed is None:
        raise ValueError(f"session {session_id} has no closed round {round_}")
    if averaged is None:
        raise ValueError(f"session {session_id}: round {round_} closed but no peer stored its average")
    return closed, averaged


def recompute(
    settings: Settings, closed: RoundClosed, averaged: RoundAveraged, request: SessionRequested | None = None
) -> ReplayResult:
    """Round ``closed.round`` recomputed alone (a round that does not depend on its start)."""
    options = RoundOptions() if request is None else RoundOptions.of(request)
    stored = _stored(settings, averaged)
    reference = load(stored)
    rounds_uri = blobkeys.rounds_uri_of(averaged.uri, closed.round)  # exactly as the peers check update URIs
    result = apply_round(closed, _fetch(settings), reference, reference, {}, options, rounds_uri=rounds_uri)
    if result.aggregate is None:
        raise ValueError(f"round {closed.round}: every update was rejected: {result.rejected}")
    return _result(closed, averaged, stored, result)


def walk(settings: Settings, found: SessionLog, round_: int) -> ReplayResult:
    """Rounds ``1 .. round_`` from the session's initial weights, carrying the outer state."""
    request = found.request
    closed, averaged = _round_of(found, request.session_id, round_)
    missing = [k for k in range(1, round_) if k not in found.closed]
    if missing:
        raise ValueError(f"session {request.session_id}: rounds {missing} have no RoundClosed")
    store, _ = blob.resolve(request.dataset_uri, settings)
    initial = initial_weights(load_dataset(store, request), request)
    results: dict[int, RoundResult] = {}
    earlier: list[int] = []

    def seen(k: int, result: RoundResult) -> None:
        results[k] = result
        stored_k = found.averaged.get(k)
        if k < round_ and stored_k is not None and sha256_hex(state_bytes(result.model)) != stored_k.sha256:
            earlier.append(k)

    rounds_uri = blobkeys.rounds_uri_of(averaged.uri, round_)
    replay_rounds(
        found.closed, round_, _fetch(settings), initial, RoundOptions.of(request), rounds_uri=rounds_uri, on_round=seen
    )
    result = _result(closed, averaged, _stored(settings, averaged), results[round_])
    return msgspec.structs.replace(result, earlier_mismatches=earlier)


def _fetch(settings: Settings) -> Callable[[RoundUpdate], bytes]:
    def fetch(update: RoundUpdate) -> bytes:
        s, k = blob.resolve(update.uri, settings)
        return s.get_bytes(k)

    return fetch


def _stored(settings: Settings, averaged: RoundAveraged) -> bytes:
    store, key = blob.resolve(averaged.uri, settings)
    return store.get_bytes(key, sha256=averaged.sha256)


def _result(closed: RoundClosed, averaged: RoundAveraged, stored: bytes, result: RoundResult) -> ReplayResult:
    rejected = dict(result.rejected)
    return ReplayResult(
        session_id=closed.session_id,
        round=closed.round,
        included=[u.peer_id for u in closed.updates if u.peer_id not in rejected],
        rejected=result.rejected,
        recomputed_sha256=hashlib.sha256(state_bytes(result.model)).hexdigest(),
        stored_sha256=hashlib.sha256(stored).hexdigest(),
        stored_uri=averaged.uri,
        aggregator=result.aggregator,
        selected=list(result.selected),
        update_bytes=result.update_bytes,
        stored_aggregator=averaged.aggregator,
        stored_selected=list(averaged.selected),
        stored_update_bytes=averaged.update_bytes,
    )


def replay_round(settings: Settings, session_id: str, round_: int) -> ReplayResult:
    found = asyncio.run(read_log(settings, session_id))
    if RoundOptions.of(found.request).needs_start:
        return walk(settings, found, round_)
    closed, averaged = _round_of(found, session_id, round_)
    return recompute(settings, closed, averaged, found.request)
