"""The gateway's Litestar app: ``create_app`` wires routes, auth, errors and the lifespan; ``run``
serves it with uvicorn until ``stop`` is set."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg
import msgspec
import uvicorn
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import ControllerRouterHandler

from swarmtrain.common import blob, bus
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings, get_settings
from swarmtrain.gateway import errors
from swarmtrain.gateway.auth import AuthController, make_jwt_auth
from swarmtrain.gateway.datasets import DatasetController
from swarmtrain.gateway.limits import GatewayRequest
from swarmtrain.gateway.peers import PeerController
from swarmtrain.gateway.projection import ProjectionWatcher
from swarmtrain.gateway.sessions import SessionController
from swarmtrain.gateway.state import Gateway, provide_gateway

log = get_logger("swarmtrain.gateway")


class Health(msgspec.Struct):
    status: str = "ok"


@get("/healthz", tags=["health"], summary="Liveness")
async def healthz() -> Health:
    return Health()


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()
    jwt_auth = make_jwt_auth(settings)
    return Litestar(
        route_handlers=_configure_routes(),
        lifespan=[_configure_lifespan(settings)],
        dependencies=_configure_dependencies(),
        exception_handlers=errors.handlers(),
        on_app_init=[jwt_auth.on_app_init],
        request_max_body_size=settings.max_upload_mb * 1024 * 1024,
        request_class=GatewayRequest,
        openapi_config=_configure_openapi(),
        state=State({"settings": settings, "jwt_auth": jwt_auth}),
    )


def _configure_routes() -> list[ControllerRouterHandler]:
    return [healthz, AuthController, DatasetController, SessionController, PeerController]


def _configure_dependencies() -> dict[str, Provide]:
    return {"gw": Provide(provide_gateway, sync_to_thread=False)}


def _configure_openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="swarmtrain",
        version="0.1.0",
        description="Train models on a swarm of peers: upload a CSV, request a session, watch it train.",
    )


def _configure_lifespan(settings: Settings) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            nc = await bus.connect(settings, "gateway")
            stack.push_async_callback(nc.drain)
            js = nc.jetstream()
            await bus.ensure_streams(js)
            pool: asyncpg.Pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10)
            stack.push_async_callback(pool.close)
            store = blob.open_store(settings.blob_url, settings)
            if isinstance(store, blob.S3Store):
                await asyncio.to_thread(store.ensure_bucket)
            projection = ProjectionWatcher(settings.database_url)
            await projection.start()
            stack.push_async_callback(projection.close)
            app.state.gateway = Gateway(settings=settings, js=js, pool=pool, store=store, projection=projection)
            log.info("gateway ready", nats=settings.nats_url, blob=settings.blob_url)
            yield

    return lifespan


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the caller's ``stop`` event is the one way out."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Serve the gateway on ``settings.host:settings.port`` until ``stop`` is set, then shut down
    gracefully (in-flight requests finish, the lifespan closes NATS and the pool)."""
    server = _Server(uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning"))
    serving = asyncio.create_task(server.serve(), name="gateway-uvicorn")
    stopping = asyncio.create_task(stop.wait(), name="gateway-stop")
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
    await serving
    if not server.started:
        raise RuntimeError(f"the gateway could not serve on {settings.host}:{settings.port}")


__all__ = ["create_app", "run"]
