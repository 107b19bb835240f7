"""Training sessions: request one (JSON, or the one-shot upload form), list them, read one, cancel
one, its event history, its live events (SSE), its per-peer metrics, and its model.

Every route answers 404 for a session of someone else's, exactly as for one that does not exist.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import msgspec
import nats.js.errors
from litestar import Controller, Request, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, NotFoundException
from litestar.params import FromPath, JSONBody, MultipartBody, Parameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage, Stream
from litestar.security.jwt import Token

from swarmtrain.common import blob, bus
from swarmtrain.common.events import (
    Hyperparameters,
    ModelSpec,
    SessionCancelled,
    SessionEvent,
    SessionRequested,
    new_id,
)
from swarmtrain.common.status import SESSION_ACTIVE, SESSION_TERMINAL
from swarmtrain.gateway import eventlog
from swarmtrain.gateway.auth import BEARER, User
from swarmtrain.gateway.datasets import (
    DEFAULT_LABEL,
    Limit,
    Offset,
    dataset_key,
    discard,
    reject_unknown_form_fields,
    store_dataset,
)
from swarmtrain.gateway.errors import Conflict, TooManyRequests, Unavailable, documented
from swarmtrain.gateway.inputs import is_id, printable
from swarmtrain.gateway.planning import (
    HyperparametersIn,
    SessionIn,
    SessionPlan,
    check_against_dataset,
    plan_session,
)
from swarmtrain.gateway.state import Gateway

TERMINAL = tuple(sorted(SESSION_TERMINAL))
ACTIVE = tuple(sorted(SESSION_ACTIVE))
JSON_BODY_LIMIT = 64 * 1024
CANCEL_ATTEMPTS = 20
KEEPALIVE_S = 15.0
RETRY_MS = 2000
MAX_EVENTS_PAGE = 1000

# ------------------------------------------------------------------ bodies


@dataclass
class SessionStartForm:
    file: UploadFile
    num_peers: int
    hyperparameters: str
    """A JSON list of {epochs, batch_size, lr}, one per peer (or one JSON object for all)."""
    label_column: str = DEFAULT_LABEL


class SessionCreated(msgspec.Struct, kw_only=True):
    session_id: str
    status: str


class SessionStartedOut(msgspec.Struct, kw_only=True):
    session_id: str
    status: str
    dataset_id: str


class PeerResult(msgspec.Struct, kw_only=True):
    peer_id: str
    status: str
    """training, done, failed or stopped."""
    hyperparameters: Hyperparameters
    shard: int | None
    """fedavg: the shard of the training rows this peer trains."""
    epoch: int
    epochs: int
    loss: float | None
    accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float | None
    reason: str | None


class RejectedUpdate(msgspec.Struct, kw_only=True):
    peer_id: str
    reason: str


class RoundFigures(msgspec.Struct, kw_only=True):
    """fedavg: one closed round."""

    round: int
    closed_at: datetime
    included: list[str]
    """Peers whose updates make the round's average."""
    left_out: list[str]
    """Participants awaited in vain."""
    rejected: list[RejectedUpdate]
    num_samples: int
    loss: float | None
    """Sample-weighted mean training loss of the included updates."""
    accuracy: float | None
    val_loss: float | None
    """The averaged model on the validation split."""
    val_accuracy: float | None


class SessionOut(msgspec.Struct, kw_only=True):
    session_id: str
    status: str
    """queued, running, completed, failed or cancelled."""
    strategy: str
    num_peers: int
    dataset_id: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    model: ModelSpec
    validation_split: float
    seed: int
    rounds: int
    on_peer_failure: str
    peers: list[PeerResult]
    round_figures: list[RoundFigures]
    best_peer_id: str | None
    best_val_accuracy: float | None
    val_accuracy: float | None
    """The session's model's accuracy on the validation split (fedavg: the final average's)."""
    model_available: bool
    reason: str | None


class EventRecord(msgspec.Struct, kw_only=True):
    seq: int
    """The event's sequence in the event stream."""
    event: SessionEvent


class EventPage(msgspec.Struct, kw_only=True):
    events: list[EventRecord]
    next_after: int
    """Pass as ``after`` for the next page."""
    more: bool
    """Whether events past ``next_after`` exist already."""


class MetricPoint(msgspec.Struct, kw_only=True):
    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float
    at: datetime


class PeerSeries(msgspec.Struct, kw_only=True):
    peer_id: str
    points: list[MetricPoint]


class MetricsOut(msgspec.Struct, kw_only=True):
    session_id: str
    peers: list[PeerSeries]


# ------------------------------------------------------------------ read models


_SESSION_COLUMNS = """session_id, owner_id, dataset_id, strategy, num_peers, status, model, validation_split,
    seed, rounds, on_peer_failure, val_accuracy, created_at, started_at, ended_at, best_peer_id,
    best_val_accuracy, model_uri, reason"""


async def idle_peers(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM peers WHERE online AND session_id IS NULL"))


async def require_idle_peers(pool: asyncpg.Pool, num_peers: int) -> None:
    idle = await idle_peers(pool)
    if idle < num_peers:
        raise ClientException(f"not enough online peers: {num_peers} requested, {idle} idle online")


async def require_session_room(gw: Gateway, owner_id: str) -> None:
    active = await gw.pool.fetchval(
        "SELECT count(*) FROM sessions WHERE owner_id = $1 AND status = ANY($2::text[])", owner_id, list(ACTIVE)
    )
    cap = gw.settings.max_active_sessions
    if active >= cap:
        raise TooManyRequests(f"you have {active} queued or running sessions: at most {cap}; cancel one or wait")


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
    )


def _session_out(row: asyncpg.Record, peers: list[PeerResult], rounds: list[RoundFigures]) -> SessionOut:
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
        round_rows = await conn.fetch(
            "SELECT * FROM session_rounds WHERE session_id = ANY($1::text[]) ORDER BY session_id, round", ids
        )
    peers: dict[str, list[PeerResult]] = {}
    for peer_row in peer_rows:
        peers.setdefault(peer_row["session_id"], []).append(_peer_result(peer_row))
    rounds: dict[str, list[RoundFigures]] = {}
    for round_row in round_rows:
        rounds.setdefault(round_row["session_id"], []).append(_round_figures(round_row))
    return [_session_out(row, peers.get(row["session_id"], []), rounds.get(row["session_id"], [])) for row in rows]


async def owned_status(gw: Gateway, owner_id: str, session_id: str) -> str:
    """The session's status; 404 unless it exists and belongs to ``owner_id``."""
    status = (
        await gw.pool.fetchval(
            "SELECT status FROM sessions WHERE session_id = $1 AND owner_id = $2", session_id, owner_id
        )
        if is_id(session_id)
        else None
    )
    if status is None:
        raise NotFoundException(f"no session {printable(session_id)}")
    return str(status)


async def _status(pool: asyncpg.Pool, session_id: str) -> str:
    status = await pool.fetchval("SELECT status FROM sessions WHERE session_id = $1", session_id)
    return str(status) if status is not None else "queued"


async def _owned_dataset(gw: Gateway, owner_id: str, dataset_id: str) -> asyncpg.Record:
    row = (
        await gw.pool.fetchrow(
            "SELECT uri, sha256, label_column, rows, features, classes FROM datasets"
            " WHERE dataset_id = $1 AND owner_id = $2",
            dataset_id,
            owner_id,
        )
        if is_id(dataset_id)
        else None
    )
    if row is None:
        raise NotFoundException(f"no dataset {printable(dataset_id)}")
    return row


async def _request_session(
    gw: Gateway, owner_id: str, dataset_id: str, uri: str, sha256: str, label_column: str, plan: SessionPlan
) -> str:
    session_id = new_id()
    await gw.append(
        SessionRequested(
            session_id=session_id,
            owner_id=owner_id,
            dataset_id=dataset_id,
            dataset_uri=uri,
            dataset_sha256=sha256,
            label_column=label_column,
            num_peers=plan.num_peers,
            strategy=plan.strategy,
            model=plan.model,
            hyperparameters=plan.hyperparameters,
            validation_split=plan.validation_split,
            seed=plan.seed,
            rounds=plan.rounds,
            on_peer_failure=plan.on_peer_failure,
        )
    )
    return session_id


def parse_hyperparameters(raw: str) -> list[HyperparametersIn] | HyperparametersIn:
    try:
        return msgspec.json.decode(raw, type=list[HyperparametersIn] | HyperparametersIn)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ClientException(
            f"hyperparameters is not valid JSON of [{{epochs, batch_size, lr}}, ...]: {exc}"
        ) from None


async def _cancel(gw: Gateway, owner_id: str, session_id: str) -> None:
    """Append ``SessionCancelled`` unless the session has ended: a compare-and-set on its subject.

    The status is read once the read models have caught up with the subject's last event, and
    the append expects that event to be still the last, so no terminal event can slip in between.
    """
    await owned_status(gw, owner_id, session_id)  # 404 before the log is asked anything
    subject = eventlog.session_subject(session_id)
    for _ in range(CANCEL_ATTEMPTS):
        try:
            last = int((await gw.js.get_last_msg(bus.EVENTS_STREAM, subject)).seq or 0)
        except nats.js.errors.NotFoundError:
            last = 0
        if not await gw.projection.wait_for(last, max_wait_s=5.0):
            raise Unavailable("the read models are behind the event log; try again shortly")
        status = await owned_status(gw, owner_id, session_id)
        if status in TERMINAL:
            raise Conflict(f"the session is {status} already")
        try:
            await gw.append(SessionCancelled(session_id=session_id), expected_last_subject_seq=last)
            return
        except bus.WrongLastSequence:
            continue  # an event arrived in between: look again
    raise Unavailable("the session is changing too fast to cancel; try again")


class _StreamLease:
    """One of a user's open live streams; released exactly once, however the stream ends (even if
    its body never started)."""

    def __init__(self, gw: Gateway, user_id: str) -> None:
        self._gw, self._user_id, self._held = gw, user_id, True
        gw.streams[user_id] += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gw.streams[self._user_id] -= 1
            if self._gw.streams[self._user_id] <= 0:
                del self._gw.streams[self._user_id]


def _sse_message(seq: int, event: SessionEvent) -> ServerSentEventMessage:
    tag = type(event).__struct_config__.tag
    return ServerSentEventMessage(id=seq, event=str(tag), data=msgspec.json.encode(event).decode())


async def _sse(gw: Gateway, session_id: str, after: int, lease: _StreamLease) -> AsyncGenerator[Any, None]:
    try:
        yield ServerSentEventMessage(comment="swarmtrain session events", data=None, retry=RETRY_MS)
        async for item in eventlog.follow(gw.js, session_id, after, gw.draining, KEEPALIVE_S):
            yield ServerSentEventMessage(comment="keep-alive", data=None) if item is None else _sse_message(*item)
    finally:
        lease.release()


def _last_event_id(request: Request[Any, Any, Any]) -> int | None:
    raw = request.headers.get("last-event-id")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise ClientException(f"Last-Event-ID must be an event's stream sequence, not {printable(raw)}")
    return int(raw)


# ------------------------------------------------------------------ routes

SessionId = Annotated[str, Parameter(description="A session id (32 hex digits).")]
After = Annotated[int, QueryParameter(ge=0, le=2**63 - 1, description="Only events past this stream sequence.")]
EventsLimit = Annotated[
    int, QueryParameter(ge=1, le=MAX_EVENTS_PAGE, description=f"Page size (at most {MAX_EVENTS_PAGE}).")
]


class SessionController(Controller):
    path = "/sessions"
    tags = ["sessions"]
    security = BEARER

    @post(
        "/",
        status_code=201,
        summary="Request a training session on an uploaded dataset",
        description="`strategy: sweep` trains one model per peer (hyperparameters: one set per peer, or one for "
        "all); `strategy: fedavg` trains one model on disjoint shards, averaged after each of `rounds` rounds "
        "(hyperparameters: one set). Capped: num_peers, epochs, rounds, model size, and queued or running "
        "sessions per user (429).",
        request_max_body_size=JSON_BODY_LIMIT,
        responses=documented(400, 401, 404, 413, 429),
    )
    async def create(
        self, request: Request[User, Token, Any], data: JSONBody[SessionIn], gw: NamedDependency[Gateway]
    ) -> SessionCreated:
        plan = plan_session(data, gw.settings)
        owner_id = request.user.user_id
        dataset = await _owned_dataset(gw, owner_id, data.dataset_id)
        check_against_dataset(
            plan, rows=dataset["rows"], features=dataset["features"], classes=dataset["classes"], settings=gw.settings
        )
        async with gw.session_locks.hold(owner_id):
            await require_session_room(gw, owner_id)
            await require_idle_peers(gw.pool, plan.num_peers)
            session_id = await _request_session(
                gw, owner_id, data.dataset_id, dataset["uri"], dataset["sha256"], dataset["label_column"], plan
            )
        return SessionCreated(session_id=session_id, status=await _status(gw.pool, session_id))

    @post(
        "/start",
        status_code=201,
        summary="Upload a CSV and request a sweep on it, in one go",
        responses=documented(400, 401, 413, 429),
    )
    async def start(
        self,
        request: Request[User, Token, Any],
        data: MultipartBody[SessionStartForm],
        gw: NamedDependency[Gateway],
    ) -> SessionStartedOut:
        owner_id = request.user.user_id
        try:
            await reject_unknown_form_fields(request, {"file", "num_peers", "hyperparameters", "label_column"})
            hps = parse_hyperparameters(data.hyperparameters)
            plan = plan_session(SessionIn(dataset_id="", num_peers=data.num_peers, hyperparameters=hps), gw.settings)
            async with gw.session_locks.hold(owner_id):
                await require_session_room(gw, owner_id)
                await require_idle_peers(gw.pool, plan.num_peers)
                dataset = await store_dataset(data.file, data.label_column, owner_id, gw)
                try:
                    check_against_dataset(
                        plan,
                        rows=dataset.rows,
                        features=dataset.features,
                        classes=dataset.classes,
                        settings=gw.settings,
                    )
                    await gw.append(dataset)
                except BaseException:
                    await discard(gw, dataset_key(dataset.dataset_id))
                    raise
                session_id = await _request_session(
                    gw, owner_id, dataset.dataset_id, dataset.uri, dataset.sha256, dataset.label_column, plan
                )
        finally:
            await data.file.close()
        status = await _status(gw.pool, session_id)
        return SessionStartedOut(session_id=session_id, status=status, dataset_id=dataset.dataset_id)

    @get(
        "/",
        summary="My sessions, newest first",
        description="Paginated with `limit` (default 100, at most 1000) and `offset`.",
        responses=documented(400, 401),
    )
    async def list_sessions(
        self, request: Request[User, Token, Any], gw: NamedDependency[Gateway], limit: Limit = 100, offset: Offset = 0
    ) -> list[SessionOut]:
        return await load_sessions(gw.pool, request.user.user_id, limit=limit, offset=offset)

    @get(
        "/{session_id:str}",
        summary="One session: its peers' progress, its rounds, its results",
        responses=documented(400, 401, 404),
    )
    async def get_session(
        self, request: Request[User, Token, Any], session_id: FromPath[SessionId], gw: NamedDependency[Gateway]
    ) -> SessionOut:
        found = (
            await load_sessions(gw.pool, request.user.user_id, session_id=session_id, limit=1)
            if is_id(session_id)
            else []
        )
        if not found:
            raise NotFoundException(f"no session {printable(session_id)}")
        return found[0]

    @post(
        "/{session_id:str}/cancel",
        status_code=202,
        summary="Cancel a queued or running session",
        description="Appends SessionCancelled; the scheduler then stops the session's peers and releases them. "
        "A session that has ended already is 409.",
        responses=documented(400, 401, 404, 409),
    )
    async def cancel(
        self, request: Request[User, Token, Any], session_id: FromPath[SessionId], gw: NamedDependency[Gateway]
    ) -> SessionCreated:
        await _cancel(gw, request.user.user_id, session_id)
        return SessionCreated(session_id=session_id, status=await _status(gw.pool, session_id))

    @get(
        "/{session_id:str}/events",
        summary="The session's event history, from the event log",
        description="Paginated by stream sequence: pass the page's `next_after` as `after` for the next one.",
        responses=documented(400, 401, 404),
    )
    async def events(
        self,
        request: Request[User, Token, Any],
        session_id: FromPath[SessionId],
        gw: NamedDependency[Gateway],
        after: After = 0,
        limit: EventsLimit = 100,
    ) -> EventPage:
        await owned_status(gw, request.user.user_id, session_id)
        events, last, more = await eventlog.page(gw.js, session_id, after, limit)
        return EventPage(
            events=[EventRecord(seq=seq, event=event) for seq, event in events], next_after=last, more=more
        )

    @get(
        "/{session_id:str}/stream",
        media_type="text/event-stream",
        summary="The session's events, live (Server-Sent Events)",
        description="The history past `after` (or the `Last-Event-ID` header), then live events, until the "
        "session completes, fails or is cancelled. Each message: `id:` the stream sequence, `event:` the event "
        "type, `data:` the event as JSON; a comment every 15 s keeps the connection alive. "
        "Try `curl -N -H 'Authorization: Bearer …' …/stream`. At most SWARMTRAIN_MAX_STREAMS_PER_USER at once "
        "(429).",
        responses=documented(400, 401, 404, 429),
    )
    async def stream(
        self,
        request: Request[User, Token, Any],
        session_id: FromPath[SessionId],
        gw: NamedDependency[Gateway],
        after: After = 0,
    ) -> ServerSentEvent:
        user_id = request.user.user_id
        await owned_status(gw, user_id, session_id)
        start = _last_event_id(request)
        if gw.streams[user_id] >= gw.settings.max_streams_per_user:
            raise TooManyRequests(
                f"you have {gw.streams[user_id]} live streams open: at most {gw.settings.max_streams_per_user}"
            )
        lease = _StreamLease(gw, user_id)
        body = _sse(gw, session_id, after if start is None else start, lease)
        weakref.finalize(body, lease.release)
        return ServerSentEvent(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @get(
        "/{session_id:str}/metrics",
        summary="Per-peer training curves: one point per epoch",
        responses=documented(400, 401, 404),
    )
    async def metrics(
        self, request: Request[User, Token, Any], session_id: FromPath[SessionId], gw: NamedDependency[Gateway]
    ) -> MetricsOut:
        await owned_status(gw, request.user.user_id, session_id)
        async with gw.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            peers = await conn.fetch(
                "SELECT peer_id FROM session_peers WHERE session_id = $1 ORDER BY peer_id", session_id
            )
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

    @get(
        "/{session_id:str}/model",
        media_type="application/octet-stream",
        summary="The session's model (safetensors): the best peer's (sweep) or the final average (fedavg)",
        responses=documented(400, 401, 404),
    )
    async def model(
        self, request: Request[User, Token, Any], session_id: FromPath[SessionId], gw: NamedDependency[Gateway]
    ) -> Stream:
        row = (
            await gw.pool.fetchrow(
                "SELECT status, model_uri FROM sessions WHERE session_id = $1 AND owner_id = $2",
                session_id,
                request.user.user_id,
            )
            if is_id(session_id)
            else None
        )
        if row is None:
            raise NotFoundException(f"no session {printable(session_id)}")
        if row["model_uri"] is None:
            raise NotFoundException(f"no model yet: the session is {row['status']}")
        store, key = blob.resolve(row["model_uri"], gw.settings)
        if not await asyncio.to_thread(store.exists, key):
            raise NotFoundException("the session's model is missing from the blob store")
        return Stream(
            store.iter_chunks(key),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{session_id}.safetensors"'},
        )
