"""The gateway's Litestar app: ``create_app`` wires routes, auth, errors and the lifespan; ``run``
serves it with uvicorn until ``stop`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import uvicorn
from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import ControllerRouterHandler

from swarmtrain.common import blob, bus, pg
from swarmtrain.common.logging import get_logger
from swarmtrain.common.settings import Settings, get_settings
from swarmtrain.common.version import VERSION
from swarmtrain.gateway import dashboard, errors
from swarmtrain.gateway.auth import AuthController, make_jwt_auth
from swarmtrain.gateway.blobs import BlobController
from swarmtrain.gateway.datasets import DatasetController
from swarmtrain.gateway.health import healthz, readyz
from swarmtrain.gateway.inputs import reject_unknown_query_parameters
from swarmtrain.gateway.limits import GatewayRequest
from swarmtrain.gateway.passwords import Passwords
from swarmtrain.gateway.peers import PeerController
from swarmtrain.gateway.projection import ProjectionWatcher
from swarmtrain.gateway.prometheus import prometheus_metrics
from swarmtrain.gateway.sessions import SessionController
from swarmtrain.gateway.state import Gateway, provide_gateway
from swarmtrain.gateway.throttle import SignInThrottle

log = get_logger("swarmtrain.gateway")
SHUTDOWN_GRACE_S = 10


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()
    jwt_auth = make_jwt_auth(settings)
    return Litestar(
        route_handlers=_configure_routes(),
        lifespan=[_configure_lifespan(settings)],
        dependencies=_configure_dependencies(),
        exception_handlers=errors.handlers(),
        before_request=reject_unknown_query_parameters,
        on_app_init=[jwt_auth.on_app_init, _security_per_route],
        request_max_body_size=settings.max_upload_mb * 1024 * 1024,
        request_class=GatewayRequest,
        openapi_config=_configure_openapi(),
        state=State({"settings": settings, "jwt_auth": jwt_auth}),
        template_config=dashboard.TEMPLATES,
    )


def _configure_routes() -> list[ControllerRouterHandler]:
    ui: list[ControllerRouterHandler] = [prometheus_metrics, *dashboard.ROUTES]
    return [healthz, readyz, AuthController, DatasetController, SessionController, PeerController, BlobController, *ui]


def _configure_dependencies() -> dict[str, Provide]:
    return {"gw": Provide(provide_gateway, sync_to_thread=False)}


def _configure_openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="swarmtrain",
        version=VERSION,
        description="Train models on a swarm of peers: upload a CSV, request a session, watch it train. "
        "Sign up, sign in for an access token, and send it as `Authorization: Bearer <token>` to every route "
        "marked with the BearerToken scheme. Errors are RFC 9457 problem details (application/problem+json).",
    )


def _security_per_route(app_config: AppConfig) -> AppConfig:
    """The JWT plugin marks every operation as needing a token; the controllers say it themselves
    instead, so the public routes (sign-up, sign-in, health, schema) show none."""
    if app_config.openapi_config is not None:
        app_config.openapi_config.security = None
    return app_config


def _configure_lifespan(settings: Settings) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            gateway = await _open_gateway(settings, stack)
            app.state.gateway = gateway
            log.info("gateway ready", nats=settings.nats_url, blob=settings.blob_url)
            try:
                yield
            finally:
                gateway.draining.set()

    return lifespan


async def _open_gateway(settings: Settings, stack: contextlib.AsyncExitStack) -> Gateway:
    """Connect to NATS, PostgreSQL and the blob store; ``stack`` closes them in reverse order."""
    nc = await bus.connect(settings, "gateway")
    stack.push_async_callback(nc.drain)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    # no connection made here: a gateway (re)started while PostgreSQL restarts serves at once, and
    # answers what needs the database with 503 until it is back
    pool = await pg.create_pool(settings.database_url, min_size=0, max_size=10)
    stack.push_async_callback(pool.close)
    store = blob.open_store(settings.blob_url, settings)
    if isinstance(store, blob.S3Store):
        await asyncio.to_thread(store.ensure_bucket)
    projection = ProjectionWatcher(settings.database_url)
    await projection.start()
    stack.push_async_callback(projection.close)
    passwords = Passwords(settings)
    await passwords.start()
    return Gateway(
        settings=settings,
        nc=nc,
        js=js,
        pool=pool,
        store=store,
        projection=projection,
        passwords=passwords,
        throttle=SignInThrottle(settings),
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the caller's ``stop`` event is the one way out."""

    def __init__(self, config: uvicorn.Config, stop: asyncio.Event) -> None:
        super().__init__(config)
        self.stop = stop

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:  # uvicorn's answer to a lifespan that did not start
            if not self.stop.is_set():
                raise
            self.should_exit = True  # it did not start because it was stopped (bus.Stopped): no failure


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Serve the gateway on ``settings.host:settings.port`` until ``stop`` is set, then shut down
    gracefully (in-flight requests finish, the lifespan closes NATS and the pool)."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S
    )
    server = _Server(config, stop)
    serving = asyncio.create_task(server.serve(), name="gateway-uvicorn")
    stopping = asyncio.create_task(stop.wait(), name="gateway-stop")
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if (gateway := getattr(app.state, "gateway", None)) is not None:
            gateway.draining.set()  # live event streams end first, or uvicorn would wait for them
        server.should_exit = True
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
    await serving
    if not server.started and stop.is_set():
        raise bus.Stopped("stopped before the gateway served (waiting for NATS or PostgreSQL)")
    if not server.started:
        raise RuntimeError(f"the gateway could not serve on {settings.host}:{settings.port}")


__all__ = ["create_app", "run"]
