"""The session routes' reads of the read models (PostgreSQL, written by the projector only).

Every function that takes a ``session_id`` looks among ``owner_id``'s sessions only and returns
``None`` for anything else: the routes turn that into 404 with ``ownership.owned``.
"""

from __future__ import annotations

import asyncpg
import msgspec
from litestar.exceptions import ClientException

from swarmtrain.common.events import Hyperparameters, ModelSpec
from swarmtrain.common.fedopts import RoundOptions, describe
from swarmtrain.common.search import SearchSpec
from swarmtrain.common.specs import Requirements, meets
from swarmtrain.common.status import SESSION_ACTIVE
from swarmtrain.common.strategies import rules
from swarmtrain.gateway.errors import TooManyRequests
from swarmtrain.gateway.peers import stored_specs
from swarmtrain.gateway.sessions.schemas import (
    BestOut,
    MetricPoint,
    MetricsOut,
    PeerResult,
    PeerSeries,
    RejectedUpdate,
    RoundFigures,
    SearchOut,
    SessionOut,
    TrialOut,
)

ACTIVE = tuple(sorted(SESSION_ACTIVE))

_SESSION_COLUMNS = """session_id, owner_id, dataset_id, strategy, num_peers, status, model, validation_split,
    seed, rounds, on_peer_failure, val_accuracy, created_at, started_at, ended_at, best_peer_id,
    best_val_accuracy, model_uri, reason, parent_session_id, parent_round, excluded_peers,
    requirements, queue, queue_timeout_s, priority, precision, placement, round_options, search, search_result,
    task, validation_dataset_id,
    CASE WHEN status = 'queued' THEN (
        SELECT count(*) + 1 FROM sessions q WHERE q.status = 'queued' AND (q.priority > sessions.priority
            OR (q.priority = sessions.priority AND q.requested_seq < sessions.requested_seq))
    ) END AS queue_position"""


# ------------------------------------------------------------------ caps


async def require_idle_peers(pool: asyncpg.Pool, num_peers: int, requirements: Requirements | None = None) -> None:
    """400 unless ``num_peers`` online idle peers meet ``requirements`` (their specs, ``specs.meets``)."""
    if requirements is None:
        idle = int(await pool.fetchval("SELECT count(*) FROM peers WHERE online AND session_id IS NULL"))
        if idle < num_peers:
            raise ClientException(f"not enough online peers: {num_peers} requested, {idle} idle online")
        return
    rows = await pool.fetch("SELECT specs FROM peers WHERE online AND session_id IS NULL")
    matching = sum(1 for row in rows if meets(stored_specs(row["specs"]), requirements))
    if matching < num_peers:
        raise ClientException(
            f"not enough matching peers: {num_peers} requested, {matching} of {len(rows)} idle online peers match "
            f"the requirements; pass queue: true to wait for them"
        )


async def peer_capacities(pool: asyncpg.Pool) -> list[int]:
    """The memory each online peer with known specs trains in: its GPU's, or its host's."""
    rows = await pool.fetch("SELECT specs FROM peers WHERE online")
    found = []
    for row in rows:
        specs = stored_specs(row["specs"])
        if specs is not None:
            gpu = specs.training_gpu
            found.append(gpu.memory_bytes if gpu is not None else specs.memory_bytes)
    return found


async def require_session_room(pool: asyncpg.Pool, owner_id: str, cap: int) -> None:
    active = await pool.fetchval(
        "SELECT count(*) FROM sessions WHERE owner_id = $1 AND status = ANY($2::text[])", owner_id, list(ACTIVE)
    )
    if active >= cap:
        raise TooManyRequests(f"you have {active} queued or running sessions: at most {cap}; cancel one or wait")


# ------------------------------------------------------------------ one session's status and model


async def status(pool: asyncpg.Pool, session_id: str) -> str:
    """The session's status as the read models have it (``queued`` until they have it at all)."""
    found = await pool.fetchval("SELECT status FROM sessions WHERE session_id = $1", session_id)
    return str(found) if found is not None else "queued"


async def owned_status(pool: asyncpg.Pool, owner_id: str, session_id: str) -> str | None:
    found = await pool.fetchval(
        "SELECT status FROM sessions WHERE session_id = $1 AND owner_id = $2", session_id, owner_id
    )
    return None if found is None else str(found)


async def model_row(pool: asyncpg.Pool, owner_id: str, session_id: str) -> asyncpg.Record | None:
    """``status``, ``model_uri`` (``NULL`` until the session has a model) and ``model_sha256``: the
    sha256 that the best peer's ``PeerDone`` gave for that very URI (``NULL`` if no such fact names
    it: ``SessionCompleted`` carries no sha256 of its own)."""
    row: asyncpg.Record | None = await pool.fetchrow(
        """
        SELECT s.status, s.model_uri, p.model_sha256
        FROM sessions s
        LEFT JOIN session_peers p
            ON p.session_id = s.session_id AND p.peer_id = s.best_peer_id AND p.model_uri = s.model_uri
        WHERE s.session_id = $1 AND s.owner_id = $2
        """,
        session_id,
        owner_id,
    )
    return row


# ------------------------------------------------------------------ sessions with peers and rounds


def _peer_result(row: asyncpg.Record) -> PeerResult:
    return PeerResult(
        peer_id=row["peer_id"],
        status=row["status"],
        hyperparameters=msgspec.json.decode(row["hyperparameters"], type=Hyperparameters),
        shard=row["shard"],
        epoch=row["epoch"],
        epochs=row["epochs"],
        loss=row["loss"],
        accuracy=row["accuracy"],
        val_loss=row["val_loss"],
        val_accuracy=row["val_accuracy"],
        samples_per_s=row["samples_per_s"],
        reason=row["reason"],
        precision=row["precision"],
    )


def _round_figures(row: asyncpg.Record) -> RoundFigures:
    return RoundFigures(
        round=row["round"],
        closed_at=row["closed_at"],
        included=msgspec.json.decode(row["included"], type=list[str]),
        left_out=msgspec.json.decode(row["left_out"], type=list[str]),
        rejected=msgspec.json.decode(row["rejected"], type=list[RejectedUpdate]),
        num_samples=row["num_samples"],
        loss=row["loss"],
        accuracy=row["accuracy"],
        val_loss=row["val_loss"],
        val_accuracy=row["val_accuracy"],
        aggregator=row["aggregator"],
        selected=[] if row["selected"] is None else msgspec.json.decode(row["selected"], type=list[str]),
        update_bytes=row["update_bytes"],
    )


def _search_out(row: asyncpg.Record, trial_rows: list[asyncpg.Record]) -> SearchOut | None:
    """A search's read model: its trials, counts, a time estimate, importances and the best configuration."""
    if row["search"] is None:
        return None
    spec = msgspec.json.decode(row["search"], type=SearchSpec)
    trials = [
        TrialOut(
            trial=t["trial"],
            attempt=t["attempt"],
            peer_id=t["peer_id"],
            status=t["status"],
            params=msgspec.json.decode(t["params"]),
            epoch=t["epoch"],
            epochs=t["epochs"],
            value=t["value"],
            curve=msgspec.json.decode(t["curve"]),
            rung=t["rung"],
            reason=t["reason"],
            train_seconds=t["train_seconds"],
        )
        for t in trial_rows
    ]
    count = {s: sum(t.status == s for t in trials) for s in ("done", "running", "pruned", "failed")}
    durations = [
        (t["ended_at"] - t["started_at"]).total_seconds()
        for t in trial_rows
        if t["status"] in ("done", "pruned") and t["ended_at"] is not None
    ]
    left = max(0, spec.trials - len(trials))
    active = row["status"] in SESSION_ACTIVE
    eta = (
        sum(durations) / len(durations) * (left + count["running"]) / max(1, row["num_peers"])
        if durations and active
        else (0.0 if not active else None)
    )
    result = msgspec.json.decode(row["search_result"]) if row["search_result"] is not None else {}
    best = None
    chosen = next((r for r in trial_rows if r["trial"] == result.get("best_trial")), None)
    if chosen is not None:
        best = BestOut(
            trial=chosen["trial"],
            params=msgspec.json.decode(chosen["params"]),
            value=result.get("best_value"),
            hyperparameters=msgspec.json.decode(chosen["hyperparameters"]),
            model=msgspec.json.decode(chosen["model"]),
        )
    return SearchOut(
        spec=spec,
        done=count["done"],
        running=count["running"],
        pruned=count["pruned"],
        failed=count["failed"],
        left=left,
        eta_s=eta,
        importances=dict(result.get("importances", {})),
        best=best,
        trials=trials,
    )


def _session_out(
    row: asyncpg.Record,
    peers: list[PeerResult],
    rounds: list[RoundFigures],
    trial_rows: list[asyncpg.Record] | None = None,
) -> SessionOut:
    options = (
        msgspec.json.decode(row["round_options"], type=RoundOptions)
        if row["round_options"] is not None and rules(row["strategy"]).rounds
        else None
    )
    return SessionOut(
        session_id=row["session_id"],
        status=row["status"],
        strategy=row["strategy"],
        num_peers=row["num_peers"],
        dataset_id=row["dataset_id"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        model=msgspec.json.decode(row["model"], type=ModelSpec),
        validation_split=row["validation_split"],
        seed=row["seed"],
        rounds=row["rounds"],
        on_peer_failure=row["on_peer_failure"],
        peers=peers,
        round_figures=rounds,
        best_peer_id=row["best_peer_id"],
        best_val_accuracy=row["best_val_accuracy"],
        val_accuracy=row["val_accuracy"],
        model_available=row["model_uri"] is not None,
        reason=row["reason"],
        parent_session_id=row["parent_session_id"],
        parent_round=row["parent_round"],
        excluded_peers=msgspec.json.decode(row["excluded_peers"], type=list[str]),
        requirements=None
        if row["requirements"] is None
        else msgspec.json.decode(row["requirements"], type=Requirements),
        queue=row["queue"],
        queue_timeout_s=row["queue_timeout_s"],
        priority=row["priority"],
        precision=row["precision"],
        queue_position=row["queue_position"],
        placement=row["placement"],
        round_options=options,
        round_options_summary=None if options is None else describe(options),
        search=_search_out(row, trial_rows or []),
        task=row["task"],
        validation_dataset_id=row["validation_dataset_id"],
    )


async def load_sessions(
    pool: asyncpg.Pool, owner_id: str, session_id: str | None = None, limit: int = 100, offset: int = 0
) -> list[SessionOut]:
    """The owner's sessions, newest first (or the one with ``session_id``), with peers and rounds."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(
            f"""SELECT {_SESSION_COLUMNS} FROM sessions
                WHERE owner_id = $1 AND ($2::text IS NULL OR session_id = $2)
                ORDER BY created_at DESC, session_id LIMIT $3 OFFSET $4""",
            owner_id,
            session_id,
            limit,
            offset,
        )
        ids = [row["session_id"] for row in rows]
        peer_rows = await conn.fetch(
            "SELECT * FROM session_peers WHERE session_id = ANY($1::text[]) ORDER BY session_id, peer_id", ids
        )
        # rounds only a strategy with rounds closes, trials only a search starts: not asked of
        # sessions that can have none (a round trip each, on every GET of a sweep)
        with_rounds = [row["session_id"] for row in rows if _may_have_rounds(row["strategy"])]
        round_rows = (
            await conn.fetch(
                "SELECT * FROM session_rounds WHERE session_id = ANY($1::text[]) ORDER BY session_id, round",
                with_rounds,
            )
            if with_rounds
            else []
        )
        searching = [row["session_id"] for row in rows if row["search"] is not None]
        trial_rows = (
            await conn.fetch(
                "SELECT * FROM session_trials WHERE session_id = ANY($1::text[]) ORDER BY session_id, trial", searching
            )
            if searching
            else []
        )
    peers: dict[str, list[PeerResult]] = {}
    for peer_row in peer_rows:
        peers.setdefault(peer_row["session_id"], []).append(_peer_result(peer_row))
    rounds: dict[str, list[RoundFigures]] = {}
    for round_row in round_rows:
        rounds.setdefault(round_row["session_id"], []).append(_round_figures(round_row))
    trials: dict[str, list[asyncpg.Record]] = {}
    for trial_row in trial_rows:
        trials.setdefault(trial_row["session_id"], []).append(trial_row)
    return [
        _session_out(
            row, peers.get(row["session_id"], []), rounds.get(row["session_id"], []), trials.get(row["session_id"])
        )
        for row in rows
    ]


def _may_have_rounds(strategy: str) -> bool:
    """Whether a session of ``strategy`` can have closed rounds (a name the contract does not know: yes)."""
    try:
        return rules(strategy).rounds
    except LookupError:
        return True


async def load_session(pool: asyncpg.Pool, owner_id: str, session_id: str) -> SessionOut | None:
    found = await load_sessions(pool, owner_id, session_id=session_id, limit=1)
    return found[0] if found else None


# ------------------------------------------------------------------ metrics


async def metrics(pool: asyncpg.Pool, session_id: str) -> MetricsOut:
    """Every peer of the session with its heartbeats, one point per epoch."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        peers = await conn.fetch("SELECT peer_id FROM session_peers WHERE session_id = $1 ORDER BY peer_id", session_id)
        beats = await conn.fetch(
            """SELECT peer_id, epoch, loss, accuracy, val_loss, val_accuracy, samples_per_s, occurred_at
               FROM heartbeats WHERE session_id = $1 ORDER BY peer_id, seq""",
            session_id,
        )
    series: dict[str, list[MetricPoint]] = {row["peer_id"]: [] for row in peers}
    for b in beats:
        series.setdefault(b["peer_id"], []).append(
            MetricPoint(
                epoch=b["epoch"],
                loss=b["loss"],
                accuracy=b["accuracy"],
                val_loss=b["val_loss"],
                val_accuracy=b["val_accuracy"],
                samples_per_s=b["samples_per_s"],
                at=b["occurred_at"],
            )
        )
    return MetricsOut(
        session_id=session_id, peers=[PeerSeries(peer_id=p, points=pts) for p, pts in sorted(series.items())]
    )
