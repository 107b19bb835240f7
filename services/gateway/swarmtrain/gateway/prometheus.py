"""``GET /metrics/prometheus``: the gateway's Prometheus exposition.

The counters this process keeps (events it appended) plus gauges read from the read models and
the log at scrape time: sessions by status, peers online by device, projection lag, dead letters.
Public like the health probes, so a scraper needs no token; it holds counts only, nothing personal.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import nats.errors
from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from swarmtrain.common import bus, metrics
from swarmtrain.common.status import SESSION_ACTIVE, SESSION_TERMINAL
from swarmtrain.gateway.projection import PROJECTION_NAME
from swarmtrain.gateway.state import Gateway

SCRAPE_TIMEOUT_S = 2.0
DEAD_LETTER_TABLE = "dead_letters"
"""The projector's dead-letter table, once it has one; the gauge stays 0 until then."""


async def _read_models(gw: Gateway) -> None:
    async with gw.pool.acquire() as conn:
        by_status = dict(await conn.fetch("SELECT status, count(*) FROM sessions GROUP BY status"))
        for status in sorted(SESSION_ACTIVE | SESSION_TERMINAL):
            metrics.SESSIONS.labels(status).set(by_status.get(status, 0))
        metrics.PEERS_ONLINE.clear()
        for device, count in await conn.fetch("SELECT device, count(*) FROM peers WHERE online GROUP BY device"):
            metrics.PEERS_ONLINE.labels(device).set(count)
        position = await conn.fetchval("SELECT position FROM projection_position WHERE name = $1", PROJECTION_NAME)
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", DEAD_LETTER_TABLE):
            metrics.DEAD_LETTERS.set(await conn.fetchval(f"SELECT count(*) FROM {DEAD_LETTER_TABLE}"))
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        last = await bus.last_sequence(gw.js)
        metrics.PROJECTION_LAG.set(max(0, last - int(position or 0)))


@get("/metrics/prometheus", include_in_schema=False, opt={"exclude_from_auth": True})
async def prometheus_metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw: Gateway = request.app.state.gateway
    with contextlib.suppress(
        asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError
    ):
        async with asyncio.timeout(SCRAPE_TIMEOUT_S):
            await _read_models(gw)  # a scrape never fails for a backend: the gauges keep their last values
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
