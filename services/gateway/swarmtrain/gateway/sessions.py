"""Training sessions: request one (JSON, or the one-shot upload form), list them, read one, download
the best model."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, Request, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, NotFoundException
from litestar.params import FromPath, JSONBody, MultipartBody, QueryParameter
from litestar.response import Stream
from litestar.security.jwt import Token

from swarmtrain.common import blob
from swarmtrain.common.events import Hyperparameters, ModelSpec, SessionRequested, new_id
from swarmtrain.gateway.auth import User
from swarmtrain.gateway.datasets import DEFAULT_LABEL, dataset_key, discard, store_dataset
from swarmtrain.gateway.state import Gateway

STRATEGIES = ("sweep",)
MODEL_KINDS = ("mlp",)
MAX_PEERS = 1024

# ------------------------------------------------------------------ bodies


class HyperparametersIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    epochs: int
    batch_size: int
    lr: float


class ModelIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kind: str = "mlp"
    hidden: list[int] = msgspec.field(default_factory=lambda: [128, 64])


class SessionIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dataset_id: str
    num_peers: int
    hyperparameters: list[HyperparametersIn] | HyperparametersIn
    """One set per peer, or one set for all of them."""
    strategy: str = "sweep"
    model: ModelIn = msgspec.field(default_factory=ModelIn)
    validation_split: float = 0.2
    seed: int = 0


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
    hyperparameters: Hyperparameters
    epoch: int
    epochs: int
    loss: float | None
    accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float | None
    reason: str | None


class SessionOut(msgspec.Struct, kw_only=True):
    session_id: str
    status: str
    strategy: str
    num_peers: int
    dataset_id: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    model: ModelSpec
    validation_split: float
    seed: int
    peers: list[PeerResult]
    best_peer_id: str | None
    best_val_accuracy: float | None
    model_available: bool
    reason: str | None


# ------------------------------------------------------------------ validation (pure)


class SessionPlan(msgspec.Struct, frozen=True, kw_only=True):
    num_peers: int
    model: ModelSpec
    hyperparameters: list[Hyperparameters]
    validation_split: float
    seed: int


def plan_session(
    *,
    num_peers: int,
    hyperparameters: list[HyperparametersIn] | HyperparametersIn,
    strategy: str = "sweep",
    model: ModelIn | None = None,
    validation_split: float = 0.2,
    seed: int = 0,
) -> SessionPlan:
    """Check a session request; raises ``ClientException`` (400) naming the first bad value."""
    model = model or ModelIn()
    if strategy not in STRATEGIES:
        raise ClientException(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if not 1 <= num_peers <= MAX_PEERS:
        raise ClientException(f"num_peers must be between 1 and {MAX_PEERS}, not {num_peers}")
    if model.kind not in MODEL_KINDS:
        raise ClientException(f"unknown model kind {model.kind!r}: expected one of {', '.join(MODEL_KINDS)}")
    if any(size < 1 for size in model.hidden):
        raise ClientException(f"model.hidden sizes must be at least 1, not {model.hidden}")
    if not (math.isfinite(validation_split) and 0 < validation_split <= 0.9):
        raise ClientException(f"validation_split must be in (0, 0.9], not {validation_split}")
    if isinstance(hyperparameters, list):
        if len(hyperparameters) != num_peers:
            raise ClientException(
                f"hyperparameters has {len(hyperparameters)} entries for {num_peers} peers: "
                "give one per peer, or a single object for all"
            )
        sets = hyperparameters
    else:
        sets = [hyperparameters] * num_peers
    for i, hp in enumerate(sets):
        where = f"hyperparameters[{i}]" if isinstance(hyperparameters, list) else "hyperparameters"
        if hp.epochs < 1:
            raise ClientException(f"{where}.epochs must be at least 1, not {hp.epochs}")
        if hp.batch_size < 1:
            raise ClientException(f"{where}.batch_size must be at least 1, not {hp.batch_size}")
        if not (math.isfinite(hp.lr) and hp.lr > 0):
            raise ClientException(f"{where}.lr must be a positive finite number, not {hp.lr}")
    return SessionPlan(
        num_peers=num_peers,
        model=ModelSpec(kind="mlp", hidden=list(model.hidden)),
        hyperparameters=[Hyperparameters(epochs=h.epochs, batch_size=h.batch_size, lr=h.lr) for h in sets],
        validation_split=validation_split,
        seed=seed,
    )


def parse_hyperparameters(raw: str) -> list[HyperparametersIn] | HyperparametersIn:
    try:
        return msgspec.json.decode(raw, type=list[HyperparametersIn] | HyperparametersIn)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ClientException(
            f"hyperparameters is not valid JSON of [{{epochs, batch_size, lr}}, ...]: {exc}"
        ) from None


# ------------------------------------------------------------------ read models


_SESSION_COLUMNS = """session_id, owner_id, dataset_id, strategy, num_peers, status, model, validation_split,
    seed, created_at, started_at, ended_at, best_peer_id, best_val_accuracy, model_uri, reason"""


async def idle_peers(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM peers WHERE online AND session_id IS NULL"))


async def require_idle_peers(pool: asyncpg.Pool, num_peers: int) -> None:
    idle = await idle_peers(pool)
    if idle < num_peers:
        raise ClientException(f"not enough online peers: {num_peers} requested, {idle} idle online")


def _peer_result(row: asyncpg.Record) -> PeerResult:
    return PeerResult(
        peer_id=row["peer_id"],
        status=row["status"],
        hyperparameters=msgspec.json.decode(row["hyperparameters"], type=Hyperparameters),
        epoch=row["epoch"],
        epochs=row["epochs"],
        loss=row["loss"],
        accuracy=row["accuracy"],
        val_loss=row["val_loss"],
        val_accuracy=row["val_accuracy"],
        samples_per_s=row["samples_per_s"],
        reason=row["reason"],
    )


def _session_out(row: asyncpg.Record, peers: list[PeerResult]) -> SessionOut:
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
        peers=peers,
        best_peer_id=row["best_peer_id"],
        best_val_accuracy=row["best_val_accuracy"],
        model_available=row["model_uri"] is not None,
        reason=row["reason"],
    )


async def load_sessions(
    pool: asyncpg.Pool, owner_id: str, session_id: str | None = None, limit: int = 100
) -> list[SessionOut]:
    """The owner's sessions, newest first (or the one with ``session_id``), with their peers."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(
            f"""SELECT {_SESSION_COLUMNS} FROM sessions
                WHERE owner_id = $1 AND ($2::text IS NULL OR session_id = $2)
                ORDER BY created_at DESC, session_id LIMIT $3""",
            owner_id,
            session_id,
            limit,
        )
        peer_rows = await conn.fetch(
            "SELECT * FROM session_peers WHERE session_id = ANY($1::text[]) ORDER BY session_id, peer_id",
            [row["session_id"] for row in rows],
        )
    peers: dict[str, list[PeerResult]] = {}
    for peer_row in peer_rows:
        peers.setdefault(peer_row["session_id"], []).append(_peer_result(peer_row))
    return [_session_out(row, peers.get(row["session_id"], [])) for row in rows]


async def _status(pool: asyncpg.Pool, session_id: str) -> str:
    status = await pool.fetchval("SELECT status FROM sessions WHERE session_id = $1", session_id)
    return str(status) if status is not None else "queued"


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
            strategy="sweep",
            model=plan.model,
            hyperparameters=plan.hyperparameters,
            validation_split=plan.validation_split,
            seed=plan.seed,
        )
    )
    return session_id


# ------------------------------------------------------------------ routes


class SessionController(Controller):
    path = "/sessions"
    tags = ["sessions"]

    @post("/", status_code=201, summary="Request a training session on an uploaded dataset")
    async def create(
        self, request: Request[User, Token, Any], data: JSONBody[SessionIn], gw: NamedDependency[Gateway]
    ) -> SessionCreated:
        plan = plan_session(
            num_peers=data.num_peers,
            hyperparameters=data.hyperparameters,
            strategy=data.strategy,
            model=data.model,
            validation_split=data.validation_split,
            seed=data.seed,
        )
        owner_id = request.user.user_id
        dataset = await gw.pool.fetchrow(
            "SELECT uri, sha256, label_column FROM datasets WHERE dataset_id = $1 AND owner_id = $2",
            data.dataset_id,
            owner_id,
        )
        if dataset is None:
            raise NotFoundException(f"no dataset {data.dataset_id!r}")
        await require_idle_peers(gw.pool, plan.num_peers)
        session_id = await _request_session(
            gw, owner_id, data.dataset_id, dataset["uri"], dataset["sha256"], dataset["label_column"], plan
        )
        return SessionCreated(session_id=session_id, status=await _status(gw.pool, session_id))

    @post("/start", status_code=201, summary="Upload a CSV and request a session on it, in one go")
    async def start(
        self,
        request: Request[User, Token, Any],
        data: MultipartBody[SessionStartForm],
        gw: NamedDependency[Gateway],
    ) -> SessionStartedOut:
        owner_id = request.user.user_id
        try:
            plan = plan_session(num_peers=data.num_peers, hyperparameters=parse_hyperparameters(data.hyperparameters))
            await require_idle_peers(gw.pool, plan.num_peers)
            dataset = await store_dataset(data.file, data.label_column, owner_id, gw)
            try:
                await gw.append(dataset)
            except BaseException:
                await discard(gw, dataset_key(dataset.dataset_id))
                raise
        finally:
            await data.file.close()
        session_id = await _request_session(
            gw, owner_id, dataset.dataset_id, dataset.uri, dataset.sha256, dataset.label_column, plan
        )
        status = await _status(gw.pool, session_id)
        return SessionStartedOut(session_id=session_id, status=status, dataset_id=dataset.dataset_id)

    @get("/", summary="My sessions, newest first")
    async def list_sessions(
        self,
        request: Request[User, Token, Any],
        gw: NamedDependency[Gateway],
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> list[SessionOut]:
        return await load_sessions(gw.pool, request.user.user_id, limit=limit)

    @get("/{session_id:str}", summary="One session with its peers' progress")
    async def get_session(
        self, request: Request[User, Token, Any], session_id: FromPath[str], gw: NamedDependency[Gateway]
    ) -> SessionOut:
        found = await load_sessions(gw.pool, request.user.user_id, session_id=session_id, limit=1)
        if not found:
            raise NotFoundException(f"no session {session_id!r}")
        return found[0]

    @get(
        "/{session_id:str}/model",
        media_type="application/octet-stream",
        summary="The session's best model (safetensors)",
    )
    async def model(
        self, request: Request[User, Token, Any], session_id: FromPath[str], gw: NamedDependency[Gateway]
    ) -> Stream:
        row = await gw.pool.fetchrow(
            "SELECT status, model_uri FROM sessions WHERE session_id = $1 AND owner_id = $2",
            session_id,
            request.user.user_id,
        )
        if row is None:
            raise NotFoundException(f"no session {session_id!r}")
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
