"""Liveness and readiness, both public (for probes).

/readyz never answers 500: whatever a backend raises while it is going away (asyncpg's errors, OS
errors, protocol errors, timeouts) makes it "unreachable" and the answer 503.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec

from swarmtrain.common import bus
from swarmtrain.gateway.errors import PROBLEM_JSON, Problem, documented, problem
from swarmtrain.gateway.projection import PROJECTION_NAME
from swarmtrain.gateway.prometheus import DEAD_LETTER_TABLE
from swarmtrain.gateway.state import Gateway

CHECK_TIMEOUT_S = 2.0


class Health(msgspec.Struct):
    status: str = "ok"


class Readiness(msgspec.Struct, kw_only=True):
    status: str
    """ready; or degraded: serving, but some events sit in the projector's dead letters."""
    nats: str
    """connected, or what is wrong."""
    postgres: str
    """reachable, or what is wrong."""
    stream_last_seq: int | None
    projection_position: int | None
    projection_lag: int | None
    """Events appended but not yet in the read models: stream_last_seq - projection_position."""
    dead_letters: int = 0
    """Events the projector could not apply and skipped (``swarmtrain deadletters ls``)."""


class NotReady(Problem, kw_only=True):
    """The problem /readyz answers with 503."""

    nats: str
    postgres: str


@get("/healthz", tags=["health"], summary="Liveness: the process is up", responses=documented())
async def healthz() -> Health:
    return Health()


async def _stream_last_seq(gw: Gateway) -> tuple[str, int | None]:
    if not gw.nc.is_connected:
        return "disconnected", None
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            return "connected", await bus.last_sequence(gw.js)
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}", None


async def _projection_position(gw: Gateway) -> tuple[str, int | None]:
    try:
        value = await gw.pool.fetchval(
            "SELECT position FROM projection_position WHERE name = $1", PROJECTION_NAME, timeout=CHECK_TIMEOUT_S
        )
    except asyncpg.UndefinedTableError:
        return "reachable, but the projector has not created its schema yet", None
    except Exception as exc:  # a dying server raises asyncpg's, OS and protocol errors alike: all are 503
        return f"unreachable: {type(exc).__name__}", None
    return "reachable", int(value or 0)


async def _dead_letters(gw: Gateway) -> int:
    """The projector's dead letters; 0 where it has no such table yet, or where it cannot be read
    now (readiness then rests on the position's answer, which fails the same way)."""
    try:
        return int(await gw.pool.fetchval(f"SELECT count(*) FROM {DEAD_LETTER_TABLE}", timeout=CHECK_TIMEOUT_S) or 0)
    except Exception:
        return 0


@get(
    "/readyz",
    tags=["health"],
    summary="Readiness: NATS connected, PostgreSQL reachable, the projection's lag and dead letters",
    description="503 (a problem with the same `nats` and `postgres` fields) when either is not; 200 with "
    "`status: degraded` and the count when the projector has parked events it could not apply.",
    responses={
        **documented(),
        503: ResponseSpec(
            data_container=NotReady,
            media_type=PROBLEM_JSON,
            description="NATS or PostgreSQL is not reachable.",
            generate_examples=False,
        ),
    },
)
async def readyz(request: Request[Any, Any, Any]) -> Response[Readiness]:
    gw: Gateway = request.app.state.gateway
    (nats_state, last), (pg_state, position), dead = await asyncio.gather(
        _stream_last_seq(gw), _projection_position(gw), _dead_letters(gw)
    )
    if last is None or position is None:
        return problem(503, "not ready", {"Retry-After": "1"}, nats=nats_state, postgres=pg_state)
    body = Readiness(
        status="degraded" if dead else "ready",
        dead_letters=dead,
        nats=nats_state,
        postgres=pg_state,
        stream_last_seq=last,
        projection_position=position,
        projection_lag=max(0, last - position),
    )
    return Response(body)
