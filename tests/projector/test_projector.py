"""The projector against a real nats-server and a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from swarmtrain.common import bus
from swarmtrain.common.events import (
    Heartbeat,
    Hyperparameters,
    PeerDone,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOnline,
    SessionCompleted,
    SessionStarted,
    UserRegistered,
)
from swarmtrain.common.models import MlpSpec
from swarmtrain.common.settings import Settings
from swarmtrain.projector import projection, service
from tests.factories import session_requested

HP = Hyperparameters(epochs=2, batch_size=8, lr=0.01)


def session_story(sid: str = "s1") -> list[Any]:
    return [
        UserRegistered(user_id="u1", email="a@example.org", username="a", password_hash="h"),
        PeerRegistered(peer_id="p1", name="one", device="cpu"),
        PeerWentOnline(peer_id="p1"),
        session_requested(
            sid, 1, HP, owner_id="u1", dataset_id="d1", dataset_uri="file:///x", model=MlpSpec(hidden=[4])
        ),
        PeerLocked(peer_id="p1", session_id=sid),
        SessionStarted(session_id=sid, assignments={"p1": HP}),
        Heartbeat(
            session_id=sid,
            peer_id="p1",
            epoch=1,
            epochs=2,
            loss=1.0,
            accuracy=0.5,
            val_loss=1.1,
            val_accuracy=0.4,
            samples_per_s=100.0,
        ),
        Heartbeat(
            session_id=sid,
            peer_id="p1",
            epoch=2,
            epochs=2,
            loss=0.5,
            accuracy=0.8,
            val_loss=0.6,
            val_accuracy=0.7,
            samples_per_s=110.0,
        ),
        PeerDone(
            session_id=sid,
            peer_id="p1",
            model_uri="file:///m",
            model_sha256="1",
            epochs=2,
            loss=0.5,
            accuracy=0.8,
            val_loss=0.6,
            val_accuracy=0.7,
            train_seconds=0.1,
        ),
        SessionCompleted(session_id=sid, best_peer_id="p1", best_val_accuracy=0.7, model_uri="file:///m"),
        PeerReleased(peer_id="p1", session_id=sid),
    ]


async def snapshot(db: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for table in projection.TABLES:
        rows = await db.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")
        out[table] = [tuple(r) for r in rows]
    return out


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url)
    yield conn
    await conn.close()


async def wait_position(db: asyncpg.Connection, seq: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            with_table = await db.fetchval("SELECT to_regclass('projection_position') IS NOT NULL")
            if with_table and (await db.fetchval("SELECT position FROM projection_position")) >= seq:
                return
            await asyncio.sleep(0.02)


async def test_projects_a_session_story(js: Any, projector: None, db: asyncpg.Connection) -> None:
    seq = 0
    for event in session_story():
        seq = await bus.append(js, event)
    await wait_position(db, seq)
    session = await db.fetchrow("SELECT * FROM sessions WHERE session_id = 's1'")
    assert session["status"] == "completed"
    assert session["best_peer_id"] == "p1"
    assert session["model_uri"] == "file:///m"
    sp = await db.fetchrow("SELECT * FROM session_peers")
    assert (sp["status"], sp["epoch"], sp["val_accuracy"]) == ("done", 2, 0.7)
    assert await db.fetchval("SELECT count(*) FROM heartbeats") == 2
    peer = await db.fetchrow("SELECT * FROM peers")
    assert (peer["name"], peer["online"], peer["session_id"]) == ("one", True, None)


async def test_malformed_message_is_skipped_and_later_events_flow(
    js: Any, projector: None, db: asyncpg.Connection
) -> None:
    await js.publish("user.bad.events", b"{not json")
    await js.publish("user.bad.events", b'{"type": "NoSuchEvent"}')
    seq = await bus.append(js, UserRegistered(user_id="u2", email="b@example.org", username="b", password_hash="h"))
    await wait_position(db, seq)
    assert await db.fetchval("SELECT email FROM users") == "b@example.org"


async def test_redelivered_batch_is_applied_once(settings: Settings, db: asyncpg.Connection) -> None:
    pool = await service.connect_db(settings)
    try:
        async with pool.acquire() as conn:
            await projection.ensure_schema(conn)
        batch = list(enumerate(session_story(), start=1))
        assert await projection.apply_batch(pool, batch) == len(batch)
        before = await snapshot(db)
        assert await projection.apply_batch(pool, batch[3:]) == len(batch)
        assert await snapshot(db) == before
    finally:
        await pool.close()


async def test_rebuild_restores_identical_state(
    js: Any, settings: Settings, projector: None, db: asyncpg.Connection
) -> None:
    seq = 0
    for sid in ("s1", "s2"):
        for event in session_story(sid):
            seq = await bus.append(js, event)
    await wait_position(db, seq)
    before = await snapshot(db)
    await db.execute("UPDATE sessions SET status = 'garbage'")  # damage the view
    replayed, position = await service.rebuild(settings)
    assert (replayed, position) == (seq, seq)
    assert await snapshot(db) == before
    # the running projector carries on after the rebuild
    last = await bus.append(js, UserRegistered(user_id="u9", email="z@example.org", username="z", password_hash="h"))
    await wait_position(db, last)
    assert await db.fetchval("SELECT count(*) FROM users WHERE user_id = 'u9'") == 1


async def test_projects_fedavg_rounds_and_ignores_unassigned_peers(
    js: Any, projector: None, db: asyncpg.Connection
) -> None:
    from swarmtrain.common.events import (
        ModelUpdatePublished,
        RoundAveraged,
        RoundClosed,
        RoundUpdate,
        ShardReassigned,
        UpdateRejected,
    )

    def upd(peer: str, n: int, loss: float) -> ModelUpdatePublished:
        return ModelUpdatePublished(
            session_id="f",
            round=1,
            peer_id=peer,
            uri=f"file:///{peer}",
            sha256=peer,
            num_samples=n,
            loss=loss,
            accuracy=1 - loss,
        )

    story = [
        session_requested(
            "f",
            2,
            HP,
            owner_id="u1",
            dataset_id="d1",
            dataset_uri="file:///x",
            strategy="fedavg",
            rounds=3,
            model=MlpSpec(hidden=[4]),
        ),
        SessionStarted(session_id="f", assignments={"a": HP, "b": HP}, shards={"a": 0, "b": 1}),
        upd("a", 100, 0.2),
        upd("b", 300, 0.6),
        upd("intruder", 1000, 9.0),  # not assigned: ignored
        Heartbeat(session_id="f", peer_id="intruder", epoch=1, epochs=2, loss=1.0, accuracy=0.5, samples_per_s=1.0),
        RoundClosed(
            session_id="f",
            round=1,
            updates=[RoundUpdate(peer_id=p, uri="u", sha256=p, num_samples=n) for p, n in (("a", 100), ("b", 300))],
        ),
        UpdateRejected(session_id="f", round=1, peer_id="b", reason="NaN", reported_by="a"),
        UpdateRejected(session_id="f", round=1, peer_id="b", reason="NaN", reported_by="b"),
        RoundAveraged(
            session_id="f", round=1, uri="file:///avg", sha256="s", peer_id="a", val_loss=0.3, val_accuracy=0.9
        ),
        ShardReassigned(session_id="f", shard=1, from_peer_id="b", to_peer_id="c", round=2),
    ]
    seq = 0
    for event in story:
        seq = await bus.append(js, event)
    await wait_position(db, seq)
    row = await db.fetchrow("SELECT * FROM session_rounds WHERE session_id = 'f'")
    assert row["num_samples"] == 400
    assert row["loss"] == pytest.approx((100 * 0.2 + 300 * 0.6) / 400)
    assert row["val_accuracy"] == 0.9 and row["average_uri"] == "file:///avg"
    assert row["rejected"] == '[{"reason": "NaN", "peer_id": "b"}]'
    assert await db.fetchval("SELECT count(*) FROM round_updates WHERE peer_id = 'intruder'") == 0
    assert await db.fetchval("SELECT count(*) FROM heartbeats WHERE peer_id = 'intruder'") == 0
    peers = await db.fetch("SELECT peer_id, shard, epochs FROM session_peers WHERE session_id = 'f' ORDER BY 1")
    assert [tuple(p) for p in peers] == [("a", 0, 6), ("b", 1, 6), ("c", 1, 6)]


async def test_the_first_terminal_event_of_a_session_wins(js: Any, projector: None, db: asyncpg.Connection) -> None:
    from swarmtrain.common.events import SessionCancelled, SessionFailed

    seq = 0
    for event in [
        *session_story("s9"),
        SessionFailed(session_id="s9", reason="late"),
        SessionCancelled(session_id="s9"),
    ]:
        seq = await bus.append(js, event)
    await wait_position(db, seq)
    row = await db.fetchrow("SELECT status, reason, model_uri FROM sessions WHERE session_id = 's9'")
    assert tuple(row) == ("completed", None, "file:///m")  # as the scheduler's state machine has it


async def test_a_new_schema_version_empties_the_read_models_and_replays_the_log(
    js: Any, settings: Settings, db: asyncpg.Connection
) -> None:
    story, seq = session_story(), 0
    for event in story:
        seq = await bus.append(js, event)
    pool = await service.connect_db(settings)
    try:
        async with pool.acquire() as conn:
            await projection.ensure_schema(conn)
        assert await projection.apply_batch(pool, list(enumerate(story, start=1))) == seq
        expected = await snapshot(db)
        async with pool.acquire() as conn:
            await projection.ensure_schema(conn)  # the same version: nothing is touched
            assert await snapshot(db) == expected and await projection.position(conn) == seq
            # read models an older build made, and made wrong
            await conn.execute("UPDATE sessions SET status = 'garbage'")
            await conn.execute("UPDATE projection_schema SET version = $1", projection.SCHEMA_VERSION - 1)
            await projection.ensure_schema(conn)
            assert await projection.schema_version(conn) == projection.SCHEMA_VERSION
            assert await projection.position(conn) == 0
            assert all(not rows for rows in (await snapshot(db)).values())
    finally:
        await pool.close()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(settings, stop))  # replays from sequence 1
    try:
        await wait_position(db, seq)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    assert await snapshot(db) == expected
