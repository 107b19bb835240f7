"""Poison is quarantined, not fatal: an event the projector cannot apply goes to ``dead_letters``.

A message that cannot be decoded (malformed, or a value out of the contract's bounds from an old
producer), or that PostgreSQL refuses (a value its column cannot hold, a constraint), is narrowed
down to that one message: the batch is retried one event per savepoint, the refused event is
recorded with its error and raw bytes, and the position moves past it in the same transaction.
An error that says nothing about the event (the connection lost, the server shutting down, a
serialisation failure) is not poison: it propagates, and the caller retries the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import msgspec
from nats.aio.msg import Msg

from swarmtrain.common import bus, metrics
from swarmtrain.common.events import MAX_EVENT_ID, MAX_TEXT, Event, bounded_text, decode_event, encode
from swarmtrain.projector.projection import advance, apply_in, apply_new, lock_position

POISON_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})
"""Data exception, integrity constraint violation, program limit exceeded: the event's own fault.
Every other class (08 connection, 40 rollback, 53 resources, 57 operator intervention ...) is
transient: retried, never dead-lettered."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message of the EVENTS stream: decoded, or with the reason it could not be."""

    seq: int
    subject: str
    data: bytes
    event: Event | None
    error: str = ""
    msg: Msg | None = None


class _Envelope(msgspec.Struct):
    """What a dead letter shows of a message that could not be decoded, when it has it."""

    type: str | None = None
    event_id: str | None = None


def delivery(msg: Msg) -> Delivery:
    seq = bus.stream_seq(msg)
    try:
        return Delivery(seq, msg.subject, msg.data, decode_event(msg.data), msg=msg)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return Delivery(seq, msg.subject, msg.data, None, f"undecodable: {exc}", msg=msg)


def of_events(batch: Sequence[tuple[int, Event]]) -> list[Delivery]:
    """Deliveries for events already decoded (tests, a rebuild's caller)."""
    return [Delivery(seq, getattr(event, "subject", ""), encode(event), event) for seq, event in batch]


def is_poison(exc: BaseException) -> bool:
    """Whether ``exc`` from applying one event is that event's fault (so retrying cannot help)."""
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in POISON_SQLSTATE_CLASSES
    # asyncpg's client-side DataError (an int beyond its column, a str it cannot encode) is a
    # ValueError; the others are the projection's deterministic answer to this event's values.
    return isinstance(exc, ValueError | TypeError | LookupError | ArithmeticError)


async def apply_quarantining(conn: asyncpg.Connection, deliveries: Sequence[Delivery], reached: int) -> tuple[int, int]:
    """Apply ``deliveries`` past ``reached`` inside the caller's transaction, parking poison in
    ``dead_letters``; returns (position reached, dead letters added)."""
    try:
        async with conn.transaction():  # a savepoint: the whole batch, the quick way
            return await _apply(conn, deliveries, reached)
    except Exception as exc:
        if not is_poison(exc):
            raise
    added = 0
    for d in deliveries:  # narrowed down: one savepoint per event
        if d.seq <= reached:
            continue
        try:
            async with conn.transaction():
                reached, dead = await _apply(conn, [d], reached)
                added += dead
        except Exception as exc:
            if not is_poison(exc):
                raise
            await record(conn, d, f"{type(exc).__name__}: {exc}")
            reached = await advance(conn, d.seq)
            added += 1
    return reached, added


async def _apply(conn: asyncpg.Connection, deliveries: Sequence[Delivery], reached: int) -> tuple[int, int]:
    dead, run = 0, []
    for d in deliveries:
        if d.seq <= reached:
            continue
        if d.event is not None:
            run.append((d.seq, d.event))
            continue
        reached = await apply_in(conn, run, reached)
        run = []
        await record(conn, d, d.error)
        reached = await advance(conn, d.seq)
        dead += 1
    return await apply_in(conn, run, reached), dead


ASYNC_COMMIT = {"synchronous_commit": "off"}
"""The projector's connections' setting (``service.connect_db``: no round trip per batch). A
batch's commit does not wait for its WAL to reach the disk (the WAL writer flushes it a moment
later). Safe here, and not a weaker guarantee: the batch and the position it moves to are one
transaction, so a PostgreSQL crash can only lose the latest commits *whole* (the WAL is replayed
in order: never a hole, never rows without their position). The projector then reads its stored
position back (``Rewound``, checked by each commit and each idle fetch; its start otherwise),
recreates its durable consumer there and applies those events again; they are skipped or applied
by their ids (idempotent), and the JetStream ack it sent meanwhile is not what it resumes from.
What is given up: for under a second before such a crash, a reader may see rows that vanish until
the replay applies them again. A projector crash loses nothing (the commit took place)."""


class Rewound(Exception):
    """The stored position is behind what this projector committed: the database lost commits
    (a crash of a server that does not fsync, a restore). Project again from its position."""


async def project(pool: asyncpg.Pool, deliveries: Sequence[Delivery], committed: int | None = None) -> int:
    """Commit one batch (poison parked, position moved) in one transaction; returns the dead
    letters it added. Raises what is not poison (the caller retries), and ``Rewound`` if the
    stored position is behind ``committed``, the position the caller last committed."""
    async with pool.acquire() as conn:
        try:  # the quick way: the whole batch in the transaction itself, no savepoint (two round trips fewer)
            async with conn.transaction():
                stored = await _locked(conn, committed)
                _, added = await _apply(conn, deliveries, stored)
        except Exception as exc:
            if not is_poison(exc):
                raise
            # poison in the batch: that transaction is rolled back whole; again, narrowed down
            async with conn.transaction():
                stored = await _locked(conn, committed)
                _, added = await apply_quarantining(conn, deliveries, stored)
        if added:
            metrics.DEAD_LETTERS.set(await count(conn))
    return added


async def _locked(conn: asyncpg.Connection, committed: int | None) -> int:
    """The stored position, locked (``lock_position``); ``Rewound`` if it is behind ``committed``."""
    stored = await lock_position(conn)
    if committed is not None and stored < committed:
        raise Rewound(f"position {stored}, but {committed} was committed")
    return stored


async def record(conn: asyncpg.Connection, d: Delivery, error: str) -> None:
    """Park ``d`` with its error (again: its attempts counted)."""
    envelope = _Envelope()
    if d.event is not None:
        envelope = _Envelope(type=type(d.event).__name__, event_id=d.event.event_id)
    else:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            envelope = msgspec.json.decode(d.data, type=_Envelope)
    await conn.execute(
        """
        INSERT INTO dead_letters (seq, subject, event_id, type, error, data) VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (seq) DO UPDATE SET error = EXCLUDED.error, last_tried = now(),
            attempts = dead_letters.attempts + 1
        """,
        d.seq,
        bounded_text(d.subject, MAX_TEXT),
        None if envelope.event_id is None else bounded_text(envelope.event_id, MAX_EVENT_ID),
        None if envelope.type is None else bounded_text(envelope.type, 200),
        bounded_text(error),
        d.data,
    )


async def count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM dead_letters"))


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    subject: str
    event_id: str | None
    type: str | None
    error: str
    first_seen: datetime
    last_tried: datetime
    attempts: int


async def listing(conn: asyncpg.Connection) -> list[DeadLetter]:
    rows = await conn.fetch(
        "SELECT seq, subject, event_id, type, error, first_seen, last_tried, attempts FROM dead_letters ORDER BY seq"
    )
    return [DeadLetter(**dict(row)) for row in rows]


async def retry(pool: asyncpg.Pool, seq: int | None = None) -> list[tuple[int, str | None]]:
    """Apply the stored raw event of each dead letter (or of ``seq``) again, each in its own
    transaction: on success the dead letter is deleted, else its error and attempts are updated.

    The position is not moved (it is past the dead letter already); the event's id is recorded,
    so a dead letter whose event was applied meanwhile (a copy) changes nothing and is deleted.
    Returns (seq, None when applied, else the error)."""
    async with pool.acquire() as conn:
        if seq is None:
            seqs = [int(r[0]) for r in await conn.fetch("SELECT seq FROM dead_letters ORDER BY seq")]
        else:
            seqs = [seq]
        results: list[tuple[int, str | None]] = []
        for s in seqs:
            async with conn.transaction():
                await lock_position(conn)  # one writer at a time with a running projector
                row = await conn.fetchrow("SELECT subject, data FROM dead_letters WHERE seq = $1 FOR UPDATE", s)
                if row is None:
                    raise LookupError(f"no dead letter at sequence {s}")
                data = bytes(row["data"])
                try:
                    event = decode_event(data)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    error: str | None = f"undecodable: {exc}"
                else:
                    error = await _retry_one(conn, s, event)
                if error is None:
                    await conn.execute("DELETE FROM dead_letters WHERE seq = $1", s)
                else:
                    await record(conn, Delivery(s, row["subject"], data, None), error)
            results.append((s, error))
        metrics.DEAD_LETTERS.set(await count(conn))
    return results


async def _retry_one(conn: asyncpg.Connection, seq: int, event: Event) -> str | None:
    try:
        async with conn.transaction():
            await apply_new(conn, [(seq, event)])
    except Exception as exc:
        if not is_poison(exc):
            raise
        return f"{type(exc).__name__}: {exc}"
    return None
