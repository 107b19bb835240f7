"""Forged events: what a hostile peer with a real credential can still try, and what comes of it.

Facts are written by services only (NATS refuses a peer's publish on any ``*.events`` subject:
``test_permissions``), so the one thing a peer assigned to a session can still send is a report on
its own ``peer.<id>.reports``. End to end, with the real scheduler and a real nats-server running
the generated configuration: an honest report becomes the same fact, a forged one (in another
peer's name, for a session it is not assigned to, naming an object it was not handed) becomes a
``ReportRejected`` on the peer's own subject and changes nothing in the session.

Defence in depth, kept from before the reports existed: should a session event of a peer not
assigned to the session reach the log anyway, neither the scheduler's decisions nor the read
models change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from swarmtrain.common import blob, bus, subjects
from swarmtrain.common.events import (
    TERMINAL_SESSION_EVENTS,
    Event,
    Heartbeat,
    Hyperparameters,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerRegistered,
    Presence,
    Report,
    ReportRejected,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionCancelled,
    SessionStarted,
    UpdateRejected,
    decode_event,
    encode,
)
from swarmtrain.common.models import MlpSpec
from swarmtrain.common.settings import from_env
from swarmtrain.projector import projection
from swarmtrain.scheduler.actions import Append, Clocks, Config
from swarmtrain.scheduler.decide import decide
from swarmtrain.scheduler.state import State, evolve, observe_presence
from tests.factories import session_requested
from tests.support import beating, wait_for

from .conftest import SecuredNats

HP = Hyperparameters(epochs=2, batch_size=32, lr=0.01)
SID, A, B, MALLORY = "s1", "pa", "pb", "pm"


def story(rounds_closed: bool) -> list[Event]:
    events: list[Event] = [PeerRegistered(peer_id=p, name=p, device="cpu") for p in (A, B, MALLORY)]
    events += [
        session_requested(SID, 2, HP, dataset_uri="file:///d", strategy="fedavg", rounds=3, model=MlpSpec(hidden=[4])),
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


# ------------------------------------------------------------------ end to end: an assigned peer's reports

SECRET = "test-only-blob-signing-secret-0123456789abcdef"


async def facts(admin: NATS, subject: str) -> list[Event]:
    """Every fact stored on ``subject`` so far, in order (an ephemeral consumer, no acks)."""
    js = admin.jetstream()
    sub = await bus.pull_consumer(js, bus.EVENTS_STREAM, ack=api.AckPolicy.NONE, filter_subject=subject)
    try:
        info = await sub.consumer_info()
        out: list[Event] = []
        while len(out) < (info.num_pending or 0):
            got = await bus.fetch(sub, decode_event, timeout=2)
            assert got, f"{subject}: fewer facts than pending"
            out += [event for _, event in got]
        return out
    finally:
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def scheduler(secured: SecuredNats, blob_dir: Path, tmp_path: Path) -> AsyncIterator[None]:
    """The real scheduler, with its own credential, until the block ends."""
    from swarmtrain.scheduler.service import run

    settings = from_env(
        {
            **secured.env("scheduler"),
            "SWARMTRAIN_NATS_URL": secured.url,
            "SWARMTRAIN_BLOB_URL": blob_dir.as_uri(),
            "SWARMTRAIN_BLOB_SIGNING_SECRET": SECRET,
            "SWARMTRAIN_BLOB_PUBLIC_URL": "http://gateway.invalid:8000",
            "SWARMTRAIN_STATE_DIR": str(tmp_path / "scheduler"),
            "SWARMTRAIN_PEER_TIMEOUT_S": "5",
        }
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop), name="scheduler")
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_an_assigned_peer_can_only_report_and_a_forged_report_is_rejected(
    secured: SecuredNats, blob_dir: Path, tmp_path: Path
) -> None:
    admin = await secured.connect("admin")
    gateway = (await secured.connect("gateway")).jetstream()
    await bus.ensure_streams(gateway)
    a, b = secured.env("peer-1")["SWARMTRAIN_PEER_ID"], secured.env("peer-2")["SWARMTRAIN_PEER_ID"]
    dataset = blob.FileStore(blob_dir).put_bytes("datasets/d.csv", b"a,b,label\n1,2,x\n3,4,y\n")
    sid = "f" * 32
    await bus.append(gateway, session_requested(sid, 1, HP, dataset_uri=dataset.uri, dataset_sha256=dataset.sha256))
    errors: list[str] = []
    peer = await secured.connect("peer-1", errors)
    js = peer.jetstream(timeout=2)

    async with scheduler(secured, blob_dir, tmp_path), beating(peer, [a]):
        await bus.report(js, PeerRegistered(peer_id=a, name="peer-1", device="cpu"))

        async def started() -> SessionStarted | None:
            return next((e for e in await facts(admin, f"session.{sid}.events") if isinstance(e, SessionStarted)), None)

        start = await wait_for(started, "the scheduler to start the session on peer-1", timeout=30, interval=0.2)
        assert set(start.assignments) == {a}

        # an honest report becomes the same fact (same event_id)
        beat = Heartbeat(
            event_id=f"{sid}.{a}.epoch1",  # a report's id is scoped to its session, as a peer writes it
            session_id=sid,
            peer_id=a,
            epoch=1,
            epochs=HP.epochs,
            loss=0.5,
            accuracy=0.5,
            samples_per_s=10.0,
        )
        await bus.report(js, beat)

        async def recorded() -> bool:
            return any(e.event_id == beat.event_id for e in await facts(admin, f"session.{sid}.events"))

        await wait_for(recorded, "the honest heartbeat to become a fact", timeout=20, interval=0.2)

        # the one fact it would most like to write is refused by NATS itself
        with pytest.raises(nats.errors.TimeoutError):
            await bus.append(peer.jetstream(timeout=0.5), SessionCancelled(session_id=sid, reason="forged"))

        done: dict[str, Any] = {"model_sha256": "0" * 64, "epochs": 1, "loss": 0.0, "accuracy": 1.0}
        forgeries: list[Report] = [
            # in another peer's name (on its own subject: the only one it may publish to)
            PeerDone(session_id=sid, peer_id=b, model_uri=dataset.uri, train_seconds=1.0, **done),
            # for a session it is not assigned to
            Heartbeat(session_id="e" * 32, peer_id=a, epoch=1, epochs=1, loss=0, accuracy=1, samples_per_s=1),
            # naming an object it was not handed: the gateway's environment, another object of the store
            PeerDone(session_id=sid, peer_id=a, model_uri="file:///proc/self/environ", train_seconds=1, **done),
            PeerDone(session_id=sid, peer_id=a, model_uri=dataset.uri, train_seconds=1, **done),
        ]
        for report in forgeries:
            headers = {"Nats-Msg-Id": report.event_id}
            await js.publish(subjects.peer_reports(a), encode(report), headers=headers, stream=bus.REPORTS_STREAM)

        async def rejected() -> dict[str, ReportRejected] | None:
            seen = {e.report_id: e for e in await facts(admin, f"peer.{a}.events") if isinstance(e, ReportRejected)}
            return seen if all(r.event_id in seen for r in forgeries) else None

        rejections = await wait_for(rejected, "every forged report to be rejected", timeout=30, interval=0.2)
        for report in forgeries:
            rejection = rejections[report.event_id]
            assert (rejection.peer_id, rejection.report_type) == (a, type(report).__name__)
            assert rejection.reason, rejection
        session = await facts(admin, f"session.{sid}.events")
        forged_ids = {r.event_id for r in forgeries}
        assert not [e for e in session if e.event_id in forged_ids]
        assert not [e for e in session if isinstance(e, (PeerDone, SessionCancelled, *TERMINAL_SESSION_EVENTS))]
        assert not await facts(admin, f"peer.{b}.events")  # nothing in the other peer's name either
    assert [e for e in errors if "permissions violation" in e.lower()] == [
        f'nats: permissions violation for publish to "session.{sid}.events"'
    ], errors
