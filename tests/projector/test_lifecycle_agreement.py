"""The scheduler's fold and the projector apply one set of lifecycle rules: fed the same session
events in any order, they reach the same session and run statuses (hypothesis, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    PeerDone,
    PeerFailed,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionStarted,
    ShardReassigned,
)
from swarmtrain.projector import projection
from swarmtrain.scheduler.state import State, fold
from tests.factories import session_requested

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)
PEERS = ("a", "b", "c", "d")  # d only ever joins by a reassignment


def done(peer: str) -> Callable[[str], Event]:
    return lambda sid: PeerDone(
        session_id=sid, peer_id=peer, model_uri="m", model_sha256="x", epochs=1, loss=0, accuracy=1, train_seconds=1
    )


KINDS: list[Callable[[str], Event]] = [
    lambda sid: SessionStarted(session_id=sid, assignments=dict.fromkeys("abc", HP), shards={"a": 0, "b": 1, "c": 2}),
    lambda sid: SessionStarted(session_id=sid, assignments=dict.fromkeys("ad", HP)),  # a competing start
    lambda sid: ShardReassigned(session_id=sid, shard=1, from_peer_id="b", to_peer_id="d", round=1),
    lambda sid: Heartbeat(session_id=sid, peer_id="a", epoch=1, epochs=2, loss=1, accuracy=0, samples_per_s=1),
    lambda sid: SessionCompleted(session_id=sid, best_peer_id="a", best_val_accuracy=0.5, model_uri="m"),
    lambda sid: SessionFailed(session_id=sid, reason="x"),
    lambda sid: SessionCancelled(session_id=sid),
    *(done(p) for p in PEERS),
    *((lambda sid, p=p: PeerFailed(session_id=sid, peer_id=p, reason="x")) for p in PEERS),
]
_sessions = itertools.count()
_seq = itertools.count(1)


def scheduler_statuses(events: list[Event]) -> tuple[str, dict[str, str]]:
    state = fold(State(), [(seq, e, 0.0) for seq, e in enumerate(events, 1)])
    session = state.sessions[events[0].session_id]  # type: ignore[union-attr]
    return session.status, {p: r.status for p, r in session.runs.items()}


async def projector_statuses(database_url: str, events: list[Event]) -> tuple[str, dict[str, str]]:
    sid = events[0].session_id  # type: ignore[union-attr]
    conn = await asyncpg.connect(database_url)
    try:
        await projection.ensure_schema(conn)
        async with conn.transaction():
            batch = [(next(_seq), e) for e in events]
            await projection.apply_in(conn, batch, await projection.lock_position(conn))
        status = await conn.fetchval("SELECT status FROM sessions WHERE session_id = $1", sid)
        runs = await conn.fetch("SELECT peer_id, status FROM session_peers WHERE session_id = $1", sid)
        return status, {r["peer_id"]: r["status"] for r in runs}
    finally:
        await conn.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(min_value=0, max_value=len(KINDS) - 1), max_size=12))
def test_scheduler_and_projector_reach_the_same_statuses_in_any_order(database_url: str, order: list[int]) -> None:
    sid = f"p{next(_sessions)}"
    events = [session_requested(sid, 3), *(KINDS[i](sid) for i in order)]
    assert asyncio.run(projector_statuses(database_url, events)) == scheduler_statuses(events)
