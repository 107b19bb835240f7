"""The session routes: request one (JSON, or the one-shot upload form), list them, read one, cancel
one, its event history, its live events (SSE), its per-peer metrics, and its model.

Each route checks, reads (``queries``), appends (``commands``) or streams (``live``) by calling the
module for that job. Every route answers 404 for a session of someone else's, exactly as for one
that does not exist (``ownership.owned``).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Generator, Sequence
from functools import partial
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, NotFoundException
from litestar.params import FromPath, JSONBody, MultipartBody, Parameter, QueryParameter
from litestar.response import ServerSentEvent, Stream
from litestar.security.jwt import Token

from swarmtrain.common import blob, blobkeys, formats, models, tasks
from swarmtrain.common.events import CLASSIFICATION, ValidationData
from swarmtrain.common.logging import get_logger
from swarmtrain.gateway import eventlog
from swarmtrain.gateway.auth import BEARER, User
from swarmtrain.gateway.datasets import (
    Limit,
    Offset,
    append_or_discard,
    owned_dataset,
    reject_unknown_form_fields,
    store_dataset,
)
from swarmtrain.gateway.errors import Conflict, documented
from swarmtrain.gateway.ownership import owned
from swarmtrain.gateway.sessions import commands, lineage, live, queries
from swarmtrain.gateway.sessions.corpus import LANGUAGE_MODELING, training_view
from swarmtrain.gateway.sessions.planning import (
    SessionPlan,
    check_against_dataset,
    check_fits_a_peer,
    parse_hyperparameters,
    parse_session,
    plan_session,
)
from swarmtrain.gateway.sessions.schemas import (
    EventPage,
    EventRecord,
    ForkIn,
    MetricsOut,
    SessionCancelRequested,
    SessionCreated,
    SessionIn,
    SessionOut,
    SessionStartedOut,
    SessionStartForm,
)
from swarmtrain.gateway.state import Gateway
from swarmtrain.training.formats import Summary

JSON_BODY_LIMIT = 64 * 1024
MAX_EVENTS_PAGE = 1000
FORM_FIELDS = frozenset({"file", "num_peers", "hyperparameters", "label_column"})

log = get_logger("swarmtrain.gateway.sessions")

SessionId = Annotated[str, Parameter(description="A session id (32 hex digits).")]
After = Annotated[int, QueryParameter(ge=0, le=2**63 - 1, description="Only events past this stream sequence.")]
EventsLimit = Annotated[
    int, QueryParameter(ge=1, le=MAX_EVENTS_PAGE, description=f"Page size (at most {MAX_EVENTS_PAGE}).")
]


async def _owned_status(gw: Gateway, owner_id: str, session_id: str) -> str:
    """The session's status; 404 unless it is ``owner_id``'s."""
    return await owned("session", session_id, partial(queries.owned_status, gw.pool, owner_id))


def _require_labelled(data_format: str) -> None:
    """``/start`` uploads a table: a corpus is uploaded first (``POST /datasets``), then trained."""
    if not formats.rules(data_format).labelled:
        raise ClientException(
            f"/sessions/start takes a table: upload a {data_format} dataset with POST /datasets, then POST /sessions"
            " with a transformer"
        )


async def _validation(gw: Gateway, owner_id: str, dataset: Any, validation_id: str | None) -> ValidationData | None:
    """The session's own validation set: another of ``owner_id``'s datasets (404 otherwise) of the
    training dataset's format, label column, target, features and classes (400 naming what differs)."""
    if validation_id is None:
        return None
    if validation_id == dataset["dataset_id"]:
        raise ClientException("validation_dataset_id: the validation set must be another dataset than the training one")
    other = await owned_dataset(gw, owner_id, validation_id)
    checks = [
        ("format", dataset["format"], other["format"]),
        ("label column", dataset["label_column"], other["label_column"]),
        ("target", dataset["target"], other["target"]),
        ("features", dataset["features"], other["features"]),
        ("row shape", msgspec.json.decode(dataset["shape"]), msgspec.json.decode(other["shape"])),
    ]
    if dataset["target"] == "classification":
        checks.append(("classes", dataset["classes"], other["classes"]))
        ours, theirs = msgspec.json.decode(dataset["class_counts"]), msgspec.json.decode(other["class_counts"])
        if ours and theirs:
            checks.append(("class names", sorted(ours), sorted(theirs)))
    for what, want, got in checks:
        if want != got:
            raise ClientException(
                f"validation_dataset_id: its {what} ({str(got)[:200]}) differs from the training dataset's"
                f" ({str(want)[:200]})"
            )
    return ValidationData(dataset_id=validation_id, uri=other["uri"], sha256=other["sha256"])


async def _require_room(gw: Gateway, owner_id: str, plan: SessionPlan) -> None:
    """429 when the owner's session cap is reached, else 400 when too few peers are idle (unless
    the session may queue): both read at once, on two of the pool's connections."""
    checks = [queries.require_session_room(gw.pool, owner_id, gw.settings.max_active_sessions)]
    if not plan.queues:  # a session that may wait is queued however few peers are idle now
        checks.append(queries.require_idle_peers(gw.pool, plan.num_peers, plan.requirements))
    _raise_first(await asyncio.gather(*checks, return_exceptions=True))


def _raise_first(results: Sequence[Any]) -> Sequence[Any]:
    """``results`` of ``gather(..., return_exceptions=True)``; raises the first failure in their
    order (the order the checks are documented in), not in the order they happened to end."""
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


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
        "sessions per user (429). Too few idle peers matching `requirements` is a 400, unless `queue` (or "
        "`queue_timeout_s`) asks to wait `queued`: served by `priority`, then first come first served, placed "
        "GPU peers first for large models and CPU peers for small ones; `precision` fp32, bf16 or fp16.",
        request_max_body_size=JSON_BODY_LIMIT,
        responses=documented(400, 401, 404, 413, 429),
    )
    async def create(
        self, request: Request[User, Token, Any], data: JSONBody[SessionIn], gw: NamedDependency[Gateway]
    ) -> SessionCreated:
        plan = plan_session(data, gw.settings)
        owner_id = request.user.user_id
        async with gw.session_locks.hold(owner_id):
            # the dataset, the peers' memory, the session cap and the idle peers read at once (the
            # wall time of one round trip, not four, before the append); failures in the checks' order: the
            # dataset's (404, 400) first, then the cap (429), then the peers (400)
            reads: tuple[Any, ...] = await asyncio.gather(
                owned_dataset(gw, owner_id, data.dataset_id),
                queries.peer_capacities(gw.pool),
                _require_room(gw, owner_id, plan),
                return_exceptions=True,
            )
            dataset, capacities = _raise_first(reads[:2])
            view = training_view(dataset, plan.model)  # a table's rows, or a corpus's windows
            validation = await _validation(gw, owner_id, dataset, data.validation_dataset_id)
            plan = msgspec.structs.replace(plan, validation=validation)
            if validation is not None or view.target not in (CLASSIFICATION, LANGUAGE_MODELING):
                # shard reads fit a classifier's standardization by the streamed rule only (a corpus has none)
                plan = msgspec.structs.replace(plan, data_read="whole")
            shape = view.shape
            check_against_dataset(
                plan,
                rows=view.rows,
                features=view.features,
                classes=view.outputs,
                settings=gw.settings,
                shape=shape,
            )
            check_fits_a_peer(plan, shape, capacities)
            await lineage.check_init_from(gw, owner_id, plan, (dataset["features"], dataset["classes"]))
            _raise_first(reads[2:])
            session_id = await commands.request_session(
                gw,
                owner_id,
                plan,
                dataset_id=data.dataset_id,
                uri=dataset["uri"],
                sha256=dataset["sha256"],
                label_column=dataset["label_column"],
                data=view.data,
            )
        return SessionCreated(session_id=session_id, status=await queries.status(gw.pool, session_id))

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
            await reject_unknown_form_fields(request, set(FORM_FIELDS))
            hps = parse_hyperparameters(data.hyperparameters)
            session = parse_session({"dataset_id": "", "num_peers": data.num_peers, "hyperparameters": hps})
            plan = plan_session(session, gw.settings)

            def fits(csv: Summary) -> None:
                _require_labelled(csv.data.format)
                outputs = tasks.rules(csv.target).outputs(csv.classes)
                check_against_dataset(
                    plan,
                    rows=csv.rows,
                    features=csv.features,
                    classes=outputs,
                    settings=gw.settings,
                    shape=models.data_shape(csv.features, outputs, csv.shape, task=csv.target),
                )

            async with gw.session_locks.hold(owner_id):
                await _require_room(gw, owner_id, plan)
                dataset = await store_dataset(data.file, data.label_column, owner_id, gw, check=fits)
                await append_or_discard(gw, dataset)
                session_id = await commands.request_session(
                    gw,
                    owner_id,
                    plan,
                    dataset_id=dataset.dataset_id,
                    uri=dataset.uri,
                    sha256=dataset.sha256,
                    label_column=dataset.label_column,
                    data=formats.data_spec(dataset.format, dataset.shape, target=dataset.target),
                )
        finally:
            await data.file.close()
        status = await queries.status(gw.pool, session_id)
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
        return await queries.load_sessions(gw.pool, request.user.user_id, limit=limit, offset=offset)

    @get(
        "/{session_id:str}",
        summary="One session: its peers' progress, its rounds, its results",
        responses=documented(400, 401, 404),
    )
    async def get_session(
        self, request: Request[User, Token, Any], session_id: FromPath[SessionId], gw: NamedDependency[Gateway]
    ) -> SessionOut:
        return await owned("session", session_id, partial(queries.load_session, gw.pool, request.user.user_id))

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
    ) -> SessionCancelRequested:
        await commands.cancel(gw, request.user.user_id, session_id)
        return SessionCancelRequested(session_id=session_id, status=await queries.status(gw.pool, session_id))

    @post(
        "/{session_id:str}/fork",
        status_code=201,
        summary="Fork a fedavg session at a round: a new session from that round's averaged model",
        description="Every setting is the parent's unless the body gives it. With `exclude_peers`, the starting "
        "model is the round's average recomputed from the recorded updates without those peers (by the parent's "
        "rule), and the new session trains without them. The new session records its parent and round.",
        request_max_body_size=JSON_BODY_LIMIT,
        responses=documented(400, 401, 404, 413, 429),
    )
    async def fork(
        self,
        request: Request[User, Token, Any],
        session_id: FromPath[SessionId],
        data: JSONBody[ForkIn],
        gw: NamedDependency[Gateway],
    ) -> SessionCreated:
        return await lineage.fork(gw, request.user.user_id, session_id, data)

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
        await _owned_status(gw, request.user.user_id, session_id)
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
        await _owned_status(gw, user_id, session_id)
        start = live.last_event_id(request)
        return live.open_stream(gw, user_id, session_id, after if start is None else start)

    @get(
        "/{session_id:str}/metrics",
        summary="Per-peer training curves: one point per epoch",
        responses=documented(400, 401, 404),
    )
    async def metrics(
        self, request: Request[User, Token, Any], session_id: FromPath[SessionId], gw: NamedDependency[Gateway]
    ) -> MetricsOut:
        await _owned_status(gw, request.user.user_id, session_id)
        return await queries.metrics(gw.pool, session_id)

    @get(
        "/{session_id:str}/model",
        media_type="application/octet-stream",
        summary="The session's model (safetensors): the best peer's (sweep) or the final average (fedavg)",
        description="Served only if it is an object of this session (`sessions/<session_id>/...` in the blob "
        "store) whose bytes hash to the sha256 that the fact naming it recorded: 404 for anything else, 409 if "
        "the object no longer matches that sha256.",
        responses=documented(400, 401, 404, 409),
    )
    async def model(
        self, request: Request[User, Token, Any], session_id: FromPath[SessionId], gw: NamedDependency[Gateway]
    ) -> Stream:
        row = await owned("session", session_id, partial(queries.model_row, gw.pool, request.user.user_id))
        if row["model_uri"] is None:
            raise NotFoundException(f"no model yet: the session is {row['status']}")
        key = model_key(gw.store, session_id, row["model_uri"])
        if row["model_sha256"] is None:
            raise NotFoundException("no fact records the sha256 of the session's model, so it is not served")
        await verified(gw.store, key, row["model_sha256"])
        return Stream(
            checked_chunks(gw.store, key, row["model_sha256"]),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{session_id}.safetensors"'},
        )


def model_key(store: blob.BlobStore, session_id: str, uri: str) -> str:
    """The store key of a session's model URI; 404 unless it names an object under
    ``sessions/<session_id>/`` of this store (never another session's object, never a file
    outside the store: a ``file:///proc/self/environ`` or a ``..`` is refused before any read)."""
    try:
        key = store.key_of(uri)
    except ValueError:  # OutsideStore, or a URI of another scheme
        log.warning("model URI outside the store", session_id=session_id, uri=uri[:200])
        raise NotFoundException("the session's model is not an object of this session") from None
    if not key.startswith(blobkeys.session_prefix(session_id)):
        log.warning("model URI of another session", session_id=session_id, uri=uri[:200])
        raise NotFoundException("the session's model is not an object of this session")
    return key


async def verified(store: blob.BlobStore, key: str, sha256: str) -> None:
    """Read the object through (in a worker thread) and check its sha256: 404 if missing, 409 if
    its bytes are not those the fact named (or too many to check)."""
    try:
        await asyncio.to_thread(store.verify, key, sha256)
    except blob.BlobNotFound:
        raise NotFoundException("the session's model is missing from the blob store") from None
    except blob.OutsideStore:  # a FIFO or device planted in the store
        raise NotFoundException("the session's model is not an object of this session") from None
    except blob.IntegrityError:
        log.warning("model sha256 mismatch", key=key)
        raise Conflict("the stored model does not match the sha256 recorded when it was made") from None
    except blob.TooLarge:
        raise Conflict("the stored model is larger than the gateway may read") from None


async def checked_chunks(store: blob.BlobStore, key: str, sha256: str) -> AsyncIterator[bytes]:
    """The object's bytes, hashed as they go; the last chunk is held back until the hash matches,
    so an object replaced between the check and the download ends in a broken response, never a
    complete one with other bytes."""
    chunks = store.iter_chunks(key)
    digest = hashlib.sha256()
    held: bytes | None = None
    try:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            digest.update(chunk)
            if held is not None:
                yield held
            held = chunk
    finally:
        if isinstance(chunks, Generator):
            chunks.close()  # the file, at once, even when the client hung up
    if digest.hexdigest() != sha256.lower():
        log.warning("model changed while it was served", key=key)
        raise blob.IntegrityError(f"{key}: changed while it was served")
    if held is not None:
        yield held
