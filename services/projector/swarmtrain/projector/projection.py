"""Applies events to the read models. The rows and the stream position move in one transaction."""

from __future__ import annotations

from importlib import resources
from typing import Any

import asyncpg
import msgspec

from swarmtrain.common.events import (
    DatasetUploaded,
    Event,
    Heartbeat,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOffline,
    PeerWentOnline,
    RoundAveraged,
    RoundClosed,
    SearchConcluded,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    TrialPruned,
    TrialStarted,
    UpdateRejected,
    UserRegistered,
)
from swarmtrain.common.lifecycle import ends_session, run_after, session_after, starts_session, takes_new_runs
from swarmtrain.common.status import SESSION_TERMINAL, RunStatus, SessionStatus

NAME = "main"
CHANNEL = "swarmtrain_projection"
TABLES = (
    "users",
    "datasets",
    "peers",
    "sessions",
    "session_peers",
    "heartbeats",
    "session_rounds",
    "round_updates",
    "session_trials",
)
"""The read models."""
BOOKKEEPING = ("applied_events", "dead_letters")
"""The projector's own tables, emptied and rebuilt with the read models (the gateway reads only the
dead letters' count)."""
SCHEMA_VERSION = 10
"""Bump on any change to schema.sql, or to how events are applied: on start (``ensure_schema``) a
database built with another version has its read models dropped and rebuilt from sequence 1."""
_SCHEMA_LOCK = 0x5357_5452  # pg_advisory_xact_lock key: one ensure_schema at a time
_TERMINAL = sorted(SESSION_TERMINAL)  # a session that ended takes no more heartbeats


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def ensure_schema(conn: asyncpg.Connection) -> None:
    """Create the read models; if they were built with another ``SCHEMA_VERSION`` (or by a build
    that stored none), drop them first and reset the position to 0, so the projector replays the
    log from sequence 1 into the new schema (dead letters and applied ids too)."""
    async with conn.transaction():  # the position table never shows without its row
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS projection_schema (name text PRIMARY KEY, version integer NOT NULL)"
        )
        built = await conn.fetchval("SELECT version FROM projection_schema WHERE name = $1", NAME)
        if built != SCHEMA_VERSION:
            await conn.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES + BOOKKEEPING)}, projection_position CASCADE")
        await conn.execute(resources.files("swarmtrain.projector").joinpath("schema.sql").read_text())
        await conn.execute(
            "INSERT INTO projection_position (name, position) VALUES ($1, 0) ON CONFLICT DO NOTHING", NAME
        )
        await conn.execute(
            """
            INSERT INTO projection_schema (name, version) VALUES ($1, $2)
            ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version
            """,
            NAME,
            SCHEMA_VERSION,
        )


async def schema_version(conn: asyncpg.Connection) -> int | None:
    """The ``SCHEMA_VERSION`` the read models were built with."""
    version = await conn.fetchval("SELECT version FROM projection_schema WHERE name = $1", NAME)
    return None if version is None else int(version)


async def position(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT position FROM projection_position WHERE name = $1", NAME))


async def lock_position(conn: asyncpg.Connection) -> int:
    """The stored position, locked until the caller's transaction ends."""
    return int(await conn.fetchval("SELECT position FROM projection_position WHERE name = $1 FOR UPDATE", NAME))


async def apply_in(conn: asyncpg.Connection, batch: list[tuple[int, Event]], reached: int) -> int:
    """Apply the events past ``reached`` inside the caller's transaction; store and announce the position.

    Events at or below the stored position were applied already (a redelivery after a commit
    whose ack was lost), so they are skipped: the position makes a replay idempotent. So does the
    event id: a copy of an applied event at a later position (stored again after the stream's
    dedupe window) only moves the position.
    """
    fresh = [(seq, event) for seq, event in batch if seq > reached]
    if not fresh:
        return reached
    await apply_new(conn, fresh)
    return await advance(conn, fresh[-1][0])


async def advance(conn: asyncpg.Connection, reached: int) -> int:
    """Store and announce the position ``reached`` (inside the caller's transaction)."""
    # one round trip: the NOTIFY is the RETURNING of the position's one row (sent at the commit, as before)
    await conn.execute(
        "UPDATE projection_position SET position = $2 WHERE name = $1 RETURNING pg_notify($3, position::text)",
        NAME,
        reached,
        CHANNEL,
    )
    return reached


async def apply_new(conn: asyncpg.Connection, batch: list[tuple[int, Event]]) -> None:
    """Apply the events of ``batch`` whose id was never applied, and record their ids; the
    position is the caller's business."""
    heartbeats: list[tuple[int, Heartbeat]] = []  # the bulk of the log: applied a run at a time
    for seq, event in await first_sightings(conn, batch):
        if isinstance(event, Heartbeat):
            heartbeats.append((seq, event))
        else:
            await apply_heartbeats(conn, heartbeats)
            heartbeats = []
            await apply(conn, seq, event)
    await apply_heartbeats(conn, heartbeats)


async def first_sightings(conn: asyncpg.Connection, batch: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Record the ids of ``batch`` in ``applied_events``; the events whose id was new (the first
    copy of each, in order)."""
    if not batch:
        return []
    new = {
        row[0]
        for row in await conn.fetch(
            """
            INSERT INTO applied_events (event_id, seq) SELECT * FROM unnest($1::text[], $2::bigint[])
            ON CONFLICT DO NOTHING RETURNING event_id
            """,
            [event.event_id for _, event in batch],
            [seq for seq, _ in batch],
        )
    }
    out = []
    for seq, event in batch:
        if event.event_id in new:
            new.discard(event.event_id)
            out.append((seq, event))
    return out


async def apply_batch(pool: asyncpg.Pool, batch: list[tuple[int, Event]]) -> int:
    """Apply ``(stream_seq, event)`` pairs in one transaction; returns the position reached."""
    async with pool.acquire() as conn, conn.transaction():
        return await apply_in(conn, batch, await lock_position(conn))


_INSERT_HEARTBEATS = """
    WITH b AS (
        SELECT u.* FROM unnest($1::bigint[], $2::text[], $3::text[], $4::integer[], $5::float8[], $6::float8[],
                               $7::float8[], $8::float8[], $9::float8[], $10::timestamptz[])
            AS u(seq, session_id, peer_id, epoch, loss, accuracy, val_loss, val_accuracy, samples_per_s, occurred_at)
        WHERE EXISTS (SELECT 1 FROM session_peers sp WHERE sp.session_id = u.session_id AND sp.peer_id = u.peer_id)
            AND NOT EXISTS (
                SELECT 1 FROM sessions s WHERE s.session_id = u.session_id AND s.status = ANY($11::text[])
            )
    ), beats AS (
        INSERT INTO heartbeats SELECT * FROM b ON CONFLICT DO NOTHING
    )
    INSERT INTO peers (peer_id, name, device, online, last_seen)
    SELECT b.peer_id, b.peer_id, 'unknown', false, max(b.occurred_at) FROM b GROUP BY b.peer_id
    ON CONFLICT (peer_id) DO UPDATE SET last_seen = GREATEST(peers.last_seen, EXCLUDED.last_seen)
"""
"""A run of heartbeats' rows, and their peers' ``last_seen``, in one statement: the beats of a peer
assigned to the beat's session, while that session has not ended (checked once for both)."""
_UPDATE_PROGRESS = """
    UPDATE session_peers sp SET epoch = b.epoch, loss = b.loss, accuracy = b.accuracy, val_loss = b.val_loss,
        val_accuracy = b.val_accuracy, samples_per_s = b.samples_per_s, precision = b.precision
    FROM unnest($1::text[], $2::text[], $3::integer[], $4::float8[], $5::float8[], $6::float8[], $7::float8[],
                $8::float8[], $9::text[])
        AS b(session_id, peer_id, epoch, loss, accuracy, val_loss, val_accuracy, samples_per_s, precision)
    WHERE sp.session_id = b.session_id AND sp.peer_id = b.peer_id AND sp.status = 'training' AND b.epoch >= sp.epoch
"""


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)]


async def apply_heartbeats(conn: asyncpg.Connection, heartbeats: list[tuple[int, Heartbeat]]) -> None:
    """Apply a run of consecutive heartbeats in two statements, however long the run.

    The same as applying them one by one: nothing in a run of heartbeats changes which peers a
    session has or their status, so each beat's row stands alone (the first for its epoch: one row
    per run and epoch), a peer's progress is its last beat's unless that beat is for an earlier
    epoch (a late copy never winds it back), and ``last_seen`` is the latest (it only ever grows).
    Only a peer assigned to the beat's session is touched: a forged beat shows no peer; a session
    that ended takes no more beats.
    """
    if not heartbeats:
        return
    for _, beat in heartbeats:
        if beat.trial is not None:
            await _trial_beat(conn, beat)
    rows = [
        (
            seq,
            e.session_id,
            e.peer_id,
            e.epoch,
            e.loss,
            e.accuracy,
            e.val_loss,
            e.val_accuracy,
            e.samples_per_s,
            e.occurred_at,
            e.precision,
        )
        for seq, e in heartbeats
    ]
    await conn.execute(_INSERT_HEARTBEATS, *_columns([row[:10] for row in rows], 10), _TERMINAL)
    last: dict[tuple[str, str], tuple[Any, ...]] = {}  # a peer's last beat of its highest epoch in the run
    for row in rows:
        key = (row[1], row[2])
        if key not in last or row[3] >= last[key][3]:
            last[key] = row
    await conn.execute(_UPDATE_PROGRESS, *_columns([(*row[1:9], row[10]) for row in last.values()], 9))


async def _touch_peer(conn: asyncpg.Connection, event: Event, peer_id: str, online: bool | None) -> None:
    await conn.execute(
        """
        INSERT INTO peers (peer_id, name, device, online, last_seen) VALUES ($1, $1, 'unknown', COALESCE($2, false), $3)
        ON CONFLICT (peer_id) DO UPDATE SET online = COALESCE($2, peers.online),
            last_seen = GREATEST(peers.last_seen, EXCLUDED.last_seen)
        """,
        peer_id,
        online,
        event.occurred_at,
    )


_TRIAL_RUNNING = (
    "SELECT 1 FROM session_trials WHERE session_id = $1 AND trial = $2 AND peer_id = $3 AND status = 'running'"
)


async def _trial_beat(conn: asyncpg.Connection, beat: Heartbeat) -> None:
    """A search's trial's epoch: its progress and its curve (the search's metric), the first figure
    of each epoch standing."""
    metric = await conn.fetchval(
        "SELECT coalesce(search->>'metric', 'val_accuracy') FROM sessions WHERE session_id = $1", beat.session_id
    )
    value = beat.val_loss if metric == "val_loss" else beat.val_accuracy
    await conn.execute(
        """
        UPDATE session_trials SET epoch = $4, value = coalesce($5, value),
            curve = CASE WHEN $5::double precision IS NULL THEN curve
                         ELSE curve || jsonb_build_array(jsonb_build_array($4::integer, $5::double precision)) END
        WHERE session_id = $1 AND trial = $2 AND peer_id = $3 AND status = 'running' AND epoch < $4
        """,
        beat.session_id,
        beat.trial,
        beat.peer_id,
        beat.epoch,
        value,
    )


async def _apply_search(conn: asyncpg.Connection, event: Event) -> bool:
    """A search's facts (``TrialStarted``, ``TrialPruned``, ``SearchConcluded``, a trial's
    ``PeerDone``/``PeerFailed``; a request's ``search``, once its row exists): whether ``event``
    was one of the facts (a request is applied as any, then its search)."""
    match event:
        case SessionRequested() if event.search is not None:
            await conn.execute(
                "UPDATE sessions SET search = $2::jsonb WHERE session_id = $1 AND search IS NULL",
                event.session_id,
                _json(event.search),
            )
            return False
        case TrialStarted():
            await conn.execute(
                """
                INSERT INTO session_trials (session_id, trial, attempt, peer_id, status, params, hyperparameters,
                                            model, epochs, started_at)
                VALUES ($1, $2, $3, $4, 'running', $5::jsonb, $6::jsonb, $7::jsonb, $8, $9)
                ON CONFLICT (session_id, trial) DO UPDATE SET attempt = EXCLUDED.attempt, peer_id = EXCLUDED.peer_id,
                    status = 'running', epoch = 0, value = NULL, curve = '[]'::jsonb, started_at = EXCLUDED.started_at,
                    ended_at = NULL
                WHERE session_trials.status = 'failed' AND session_trials.attempt < EXCLUDED.attempt
                """,
                event.session_id,
                event.trial,
                event.attempt,
                event.peer_id,
                _json(event.params),
                _json(event.hyperparameters),
                _json(event.model),
                event.hyperparameters.epochs,
                event.occurred_at,
            )
        case TrialPruned():
            await conn.execute(
                """UPDATE session_trials SET status = 'pruned', rung = $4, reason = $5, ended_at = $6
                   WHERE session_id = $1 AND trial = $2 AND peer_id = $3 AND status = 'running'""",
                event.session_id,
                event.trial,
                event.peer_id,
                event.rung,
                event.reason,
                event.occurred_at,
            )
        case PeerDone() if event.trial is not None:
            metric = await conn.fetchval(
                "SELECT coalesce(search->>'metric', 'val_accuracy') FROM sessions WHERE session_id = $1",
                event.session_id,
            )
            await conn.execute(
                """UPDATE session_trials SET status = 'done', epoch = $4, value = $5, ended_at = $6, train_seconds = $7
                   WHERE session_id = $1 AND trial = $2 AND peer_id = $3 AND status = 'running'""",
                event.session_id,
                event.trial,
                event.peer_id,
                event.epochs,
                event.val_loss if metric == "val_loss" else event.val_accuracy,
                event.occurred_at,
                event.train_seconds,
            )
        case PeerFailed() if event.trial is not None:
            await conn.execute(
                """UPDATE session_trials SET status = 'failed', reason = $4, ended_at = $5
                   WHERE session_id = $1 AND trial = $2 AND peer_id = $3 AND status = 'running'""",
                event.session_id,
                event.trial,
                event.peer_id,
                event.reason,
                event.occurred_at,
            )
        case SearchConcluded():
            await conn.execute(
                "UPDATE sessions SET search_result = $2::jsonb WHERE session_id = $1 AND search_result IS NULL",
                event.session_id,
                _json(event),
            )
        case _:
            return False
    return True


async def apply(conn: asyncpg.Connection, seq: int, event: Event) -> None:
    if await _apply_search(conn, event):
        return
    await _apply(conn, seq, event)
    if isinstance(event, SessionRequested) and event.search is not None:
        await _apply_search(conn, event)


async def _apply(conn: asyncpg.Connection, seq: int, event: Event) -> None:
    match event:
        case UserRegistered():
            await conn.execute(
                "INSERT INTO users VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                event.user_id,
                event.email,
                event.username,
                event.password_hash,
                event.occurred_at,
            )
        case DatasetUploaded():
            await conn.execute(
                """INSERT INTO datasets VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb,
                   $14::jsonb, $15, $16::jsonb, $17, $18::jsonb) ON CONFLICT DO NOTHING""",
                event.dataset_id,
                event.owner_id,
                event.name,
                event.uri,
                event.sha256,
                event.size_bytes,
                event.rows,
                event.features,
                event.classes,
                event.label_column,
                event.occurred_at,
                event.format,
                _json(event.shape),
                _json(event.class_counts),
                event.tokens,
                None if event.tokenizer is None else _json(event.tokenizer),
                event.target,
                _json(event.target_range),
            )
        case PeerRegistered():
            await conn.execute(
                """
                INSERT INTO peers (peer_id, name, device, online, last_seen, specs)
                VALUES ($1, $2, $3, false, $4, $5::jsonb)
                ON CONFLICT (peer_id) DO UPDATE SET name = $2, device = $3, specs = $5::jsonb,
                    last_seen = GREATEST(peers.last_seen, EXCLUDED.last_seen)
                """,
                event.peer_id,
                event.name,
                event.device,
                event.occurred_at,
                None if event.specs is None else _json(event.specs),
            )
        case PeerWentOnline():
            await _touch_peer(conn, event, event.peer_id, True)
        case PeerWentOffline():
            await _touch_peer(conn, event, event.peer_id, False)
        case PeerLocked():
            await _touch_peer(conn, event, event.peer_id, None)
            await conn.execute("UPDATE peers SET session_id = $2 WHERE peer_id = $1", event.peer_id, event.session_id)
        case PeerReleased():
            await conn.execute(
                "UPDATE peers SET session_id = NULL WHERE peer_id = $1 AND session_id = $2",
                event.peer_id,
                event.session_id,
            )
        case SessionRequested():
            await conn.execute(
                """
                INSERT INTO sessions (session_id, owner_id, dataset_id, strategy, num_peers, status, model,
                                      validation_split, seed, created_at, rounds, on_peer_failure,
                                      parent_session_id, parent_round, excluded_peers, requirements,
                                      queue, queue_timeout_s, priority, precision, requested_seq, round_options,
                                      task, validation_dataset_id)
                VALUES ($1, $2, $3, $4, $5, 'queued', $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14::jsonb,
                        $15::jsonb, $16, $17, $18, $19, $20, $21::jsonb, $22, $23)
                ON CONFLICT DO NOTHING
                """,
                event.session_id,
                event.owner_id,
                event.dataset_id,
                event.strategy,
                event.num_peers,
                _json(event.model),
                event.validation_split,
                event.seed,
                event.occurred_at,
                event.rounds,
                event.on_peer_failure,
                *_lineage(event),
                None if event.requirements is None else _json(event.requirements),
                event.queue,
                event.queue_timeout_s,
                event.priority,
                event.precision,
                seq,
                _json(event.round_options),
                event.data.task,
                None if event.validation is None else event.validation.dataset_id,
            )
        case SessionStarted():
            before = await _session_status(conn, event.session_id)
            if before is None or not starts_session(before, event):
                return  # a second start, or one after the session ended, creates no runs
            await conn.execute(
                "UPDATE sessions SET status = $2, started_at = $3, placement = NULLIF($4, '') WHERE session_id = $1",
                event.session_id,
                session_after(before, event),
                event.occurred_at,
                event.placement,
            )
            rounds = await conn.fetchval("SELECT rounds FROM sessions WHERE session_id = $1", event.session_id) or 1
            await conn.executemany(
                """
                INSERT INTO session_peers (session_id, peer_id, status, hyperparameters, epochs, shard)
                VALUES ($1, $2, 'training', $3::jsonb, $4, $5) ON CONFLICT DO NOTHING
                """,
                [
                    (event.session_id, p, _json(h), h.epochs * rounds, event.shards.get(p))
                    for p, h in event.assignments.items()
                ],
            )
        case ShardReassigned():
            before = await _session_status(conn, event.session_id)
            if before is None or not takes_new_runs(before):
                return
            await conn.execute(
                """
                INSERT INTO session_peers (session_id, peer_id, status, hyperparameters, epochs, shard)
                SELECT session_id, $2, 'training', hyperparameters, epochs, $3 FROM session_peers
                WHERE session_id = $1 AND peer_id = $4
                ON CONFLICT DO NOTHING
                """,
                event.session_id,
                event.to_peer_id,
                event.shard,
                event.from_peer_id,
            )
        case ModelUpdatePublished():
            await conn.execute(
                """
                INSERT INTO round_updates
                SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE EXISTS (
                    SELECT 1 FROM session_peers WHERE session_id = $1 AND peer_id = $3)
                ON CONFLICT DO NOTHING
                """,
                event.session_id,
                event.round,
                event.peer_id,
                event.uri,
                event.sha256,
                event.num_samples,
                event.loss,
                event.accuracy,
                event.occurred_at,
            )
        case RoundClosed():
            included = [u.peer_id for u in event.updates]
            await conn.execute(
                """
                INSERT INTO session_rounds
                    (session_id, round, closed_at, included, left_out, num_samples, loss, accuracy)
                SELECT $1, $2, $3, $4::jsonb, $5::jsonb, COALESCE(sum(num_samples), 0),
                       sum(loss * num_samples) / NULLIF(sum(num_samples), 0),
                       sum(accuracy * num_samples) / NULLIF(sum(num_samples), 0)
                FROM round_updates WHERE session_id = $1 AND round = $2 AND peer_id = ANY($6::text[])
                ON CONFLICT DO NOTHING
                """,
                event.session_id,
                event.round,
                event.occurred_at,
                _json(included),
                _json(event.left_out),
                included,
            )
        case UpdateRejected():
            await conn.execute(
                """
                UPDATE session_rounds SET rejected = rejected || $3::jsonb
                WHERE session_id = $1 AND round = $2 AND NOT rejected @> $4::jsonb
                    AND EXISTS (SELECT 1 FROM session_peers WHERE session_id = $1 AND peer_id = $5)
                """,
                event.session_id,
                event.round,
                _json([{"peer_id": event.peer_id, "reason": event.reason}]),
                _json([{"peer_id": event.peer_id}]),
                event.reported_by,
            )
        case RoundAveraged():
            await conn.execute(
                """
                UPDATE session_rounds SET val_loss = $3, val_accuracy = $4, average_uri = $5, average_sha256 = $6,
                    aggregator = $8, selected = $9::jsonb, update_bytes = $10
                WHERE session_id = $1 AND round = $2 AND average_uri IS NULL
                    AND EXISTS (SELECT 1 FROM session_peers WHERE session_id = $1 AND peer_id = $7)
                """,
                event.session_id,
                event.round,
                event.val_loss,
                event.val_accuracy,
                event.uri,
                event.sha256,
                event.peer_id,
                event.aggregator,
                _json(event.selected),
                event.update_bytes,
            )
        case Heartbeat():
            await apply_heartbeats(conn, [(seq, event)])
        case PeerDone():
            before_run = await _run_status(conn, event.session_id, event.peer_id)
            if before_run is None or run_after(before_run, event) == before_run:
                return  # not a participant, or its run ended already: the first end wins
            await conn.execute(
                """
                UPDATE session_peers SET status = $3, epoch = $4, loss = $5, accuracy = $6, val_loss = $7,
                    val_accuracy = $8, model_uri = $9, model_sha256 = $10
                WHERE session_id = $1 AND peer_id = $2
                """,
                event.session_id,
                event.peer_id,
                run_after(before_run, event),
                event.epochs,
                event.loss,
                event.accuracy,
                event.val_loss,
                event.val_accuracy,
                event.model_uri,
                event.model_sha256,
            )
        case PeerFailed():
            before_run = await _run_status(conn, event.session_id, event.peer_id)
            if before_run is None or run_after(before_run, event) == before_run:
                return
            await conn.execute(
                "UPDATE session_peers SET status = $3, reason = $4 WHERE session_id = $1 AND peer_id = $2",
                event.session_id,
                event.peer_id,
                run_after(before_run, event),
                event.reason,
            )
        case SessionCompleted() | SessionFailed() | SessionCancelled():
            before = await _session_status(conn, event.session_id)
            if before is None or not ends_session(before, event):
                return  # the first terminal event wins
            if isinstance(event, SessionCompleted):
                await conn.execute(
                    """
                    UPDATE sessions SET status = $2, ended_at = $3, best_peer_id = $4,
                        best_val_accuracy = $5, val_accuracy = $5, model_uri = $6
                    WHERE session_id = $1
                    """,
                    event.session_id,
                    session_after(before, event),
                    event.occurred_at,
                    event.best_peer_id,
                    event.best_val_accuracy,
                    event.model_uri,
                )
            else:
                await conn.execute(
                    "UPDATE sessions SET status = $2, ended_at = $3, reason = $4 WHERE session_id = $1",
                    event.session_id,
                    session_after(before, event),
                    event.occurred_at,
                    event.reason,
                )
            await conn.execute(
                "UPDATE session_peers SET status = $2 WHERE session_id = $1 AND status = 'training'",
                event.session_id,
                run_after("training", event),
            )


def _lineage(event: SessionRequested) -> tuple[str | None, int | None, str]:
    """``parent_session_id``, ``parent_round``, ``excluded_peers`` (JSON) of a session request."""
    init = event.init_from
    if init is None:
        return None, None, "[]"
    return init.session_id, init.round, _json(init.exclude_peers)


async def _session_status(conn: asyncpg.Connection, session_id: str) -> SessionStatus | None:
    status: SessionStatus | None = await conn.fetchval("SELECT status FROM sessions WHERE session_id = $1", session_id)
    return status


async def _run_status(conn: asyncpg.Connection, session_id: str, peer_id: str) -> RunStatus | None:
    status: RunStatus | None = await conn.fetchval(
        "SELECT status FROM session_peers WHERE session_id = $1 AND peer_id = $2", session_id, peer_id
    )
    return status
