"""A peer may publish on any ``session.*.events`` (static NATS permissions cannot say "only my
sessions"), so the consumers validate: a session event from a peer not assigned to the session
changes neither the scheduler's decisions nor the read models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest

from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    ModelSpec,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerRegistered,
    Presence,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionStarted,
    UpdateRejected,
)
from swarmtrain.projector import projection
from swarmtrain.scheduler.actions import Append, Clocks, Config
from swarmtrain.scheduler.decide import decide
from swarmtrain.scheduler.state import State, evolve, observe_presence
from tests.factories import session_requested

HP = Hyperparameters(epochs=2, batch_size=32, lr=0.01)
SID, A, B, MALLORY = "s1", "pa", "pb", "pm"


def story(rounds_closed: bool) -> list[Event]:
    events: list[Event] = [PeerRegistered(peer_id=p, name=p, device="cpu") for p in (A, B, MALLORY)]
    events += [
        session_requested(
            SID, 2, HP, dataset_uri="file:///d", strategy="fedavg", rounds=3, model=ModelSpec(hidden=[4])
        ),
        SessionStarted(session_id=SID, assignments={A: HP, B: HP}, shards={A: 0, B: 1}),
        ModelUpdatePublished(
            session_id=SID, round=1, peer_id=A, uri="u/a", sha256="a", num_samples=10, loss=1, accuracy=0
        ),
    ]
    if rounds_closed:
        events += [
            ModelUpdatePublished(
                session_id=SID, round=1, peer_id=B, uri="u/b", sha256="b", num_samples=10, loss=1, accuracy=0
            ),
            RoundClosed(
                session_id=SID,
                round=1,
                updates=[RoundUpdate(peer_id=p, uri=f"u/{p}", sha256=p, num_samples=10) for p in (A, B)],
            ),
        ]
    return events


def forged(peer: str = MALLORY) -> list[Event]:
    """Every session event a peer appends, in the name of ``peer``."""
    return [
        Heartbeat(session_id=SID, peer_id=peer, epoch=9, epochs=9, loss=0, accuracy=1, samples_per_s=1),
        ModelUpdatePublished(
            session_id=SID, round=1, peer_id=peer, uri="evil", sha256="e", num_samples=10**9, loss=0, accuracy=1
        ),
        ModelUpdatePublished(
            session_id=SID, round=2, peer_id=peer, uri="evil", sha256="e", num_samples=1, loss=0, accuracy=1
        ),
        UpdateRejected(session_id=SID, round=1, peer_id=A, reason="forged", reported_by=peer),
        RoundAveraged(session_id=SID, round=1, uri="evil", sha256="e", peer_id=peer, val_accuracy=1.0),
        PeerDone(
            session_id=SID,
            peer_id=peer,
            model_uri="evil",
            model_sha256="e",
            epochs=9,
            loss=0,
            accuracy=1,
            val_accuracy=1.0,
            train_seconds=1,
        ),
        PeerFailed(session_id=SID, peer_id=peer, reason="forged"),
    ]


def decisions(state: State) -> list[Any]:
    """decide()'s actions with the fields that differ on every call (ids, timestamps) left out."""
    out: list[Any] = []
    for action in decide(state, Clocks(now=10.0, wall=0.0), Config(uri=lambda key: f"file:///b/{key}")):
        if isinstance(action, Append):
            body = msgspec.to_builtins(action.event)
            body.pop("event_id"), body.pop("occurred_at")
            out.append(("append", type(action.event).__name__, body))
        else:
            out.append(repr(action))
    return out


def session_state(state: State) -> Any:
    s = state.sessions[SID]
    return (s.status, s.round, sorted(s.runs.items()), sorted(s.updates.items()), s.first_update)


@pytest.mark.parametrize("rounds_closed", [False, True])
def test_the_scheduler_ignores_session_events_from_unassigned_peers(rounds_closed: bool) -> None:
    state = State()
    for p in (A, B, MALLORY):
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu"), now=10.0)
    seq = 0
    for seq, event in enumerate(story(rounds_closed), 1):
        state = evolve(state, seq, event, 0.0)
    before, decided = session_state(state), decisions(state)
    for forged_seq, event in enumerate(forged(), seq + 1):
        state = evolve(state, forged_seq, event, 0.0)
        assert session_state(state) == before, type(event).__name__
        assert decisions(state) == decided, type(event).__name__
    # the check is on the assignment: the same events in an assigned peer's name do count
    state = evolve(state, seq + len(forged()) + 1, forged(B)[-1], 0.0)
    assert state.sessions[SID].runs[B].status == "failed"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await projection.ensure_schema(conn)
    yield pool
    await pool.close()


async def read_models(pool: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    async with pool.acquire() as conn:
        return {t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY 1, 2")] for t in projection.TABLES}


@pytest.mark.parametrize("rounds_closed", [False, True])
async def test_the_projector_ignores_session_events_from_unassigned_peers(
    pool: asyncpg.Pool, rounds_closed: bool
) -> None:
    events = story(rounds_closed)
    await projection.apply_batch(pool, list(enumerate(events, 1)))
    before = await read_models(pool)
    reached = await projection.apply_batch(pool, list(enumerate(forged(), len(events) + 1)))
    assert reached == len(events) + len(forged())  # ignored events still move the position
    assert await read_models(pool) == before
