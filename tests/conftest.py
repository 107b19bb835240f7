"""Real servers for every test: a nats-server with JetStream per test, one PostgreSQL per run with
a fresh database per test. Nothing is mocked; nothing that happens to be running is used."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from swarmtrain.common import servers
from swarmtrain.common.settings import Settings
from tests.support import wait_for

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = servers.free_port()
    proc = servers.start_postgres(tmp_path_factory.mktemp("pg") / "data", port, durable=False)
    yield port
    servers.stop(proc, signal.SIGINT)


@pytest.fixture
def database_url(postgres_port: int) -> str:
    name = f"t{next(_db_counter)}"
    servers.create_database(postgres_port, name)
    return servers.postgres_url(postgres_port, name)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = servers.free_port()
    proc = servers.start_nats(port, tmp_path / "jetstream")
    yield f"nats://127.0.0.1:{port}", proc
    servers.stop(proc, signal.SIGTERM)


@pytest.fixture
def nats_url(nats_server: tuple[str, subprocess.Popen[bytes]]) -> str:
    return nats_server[0]


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    path = tmp_path / "blobs"
    path.mkdir()
    return path


@pytest.fixture
def blob_signing_secret() -> str:
    """The secret the ``blob_server`` checks signed URLs with (``Settings.blob_signing_secret``)."""
    return "test-blob-signing-secret-0123456789abcdef"


@pytest.fixture
def blob_server(blob_dir: Path, blob_signing_secret: str) -> Iterator[str]:
    """The gateway's signed ``GET|PUT /blobs/{key}`` routes over the ``blob_dir`` store, and nothing
    else, on a free port (uvicorn in a thread); yields its base URL (``Settings.blob_public_url``)."""
    import uvicorn
    from litestar import Litestar
    from litestar.di import Provide

    from swarmtrain.common.blob import FileStore
    from swarmtrain.gateway.blobs import BlobController
    from swarmtrain.gateway.state import Gateway

    serving = Settings(blob_url=blob_dir.as_uri(), blob_signing_secret=blob_signing_secret)
    # only .settings and .store are used by the blob routes
    gateway = Gateway(serving, None, None, None, FileStore(blob_dir), None, None, None)  # type: ignore[arg-type]
    app = Litestar(route_handlers=[BlobController], dependencies={"gw": Provide(lambda: gateway, sync_to_thread=False)})
    port = servers.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="blob-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:  # uvicorn's own readiness flag; a thread has no event to await
        assert thread.is_alive() and time.monotonic() < deadline, "the blob server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


@pytest.fixture
def settings(nats_url: str, database_url: str, blob_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        nats_url=nats_url,
        database_url=database_url,
        blob_url=blob_dir.as_uri(),
        jwt_secret="test-secret-0123456789abcdef0123456789",
        state_dir=str(tmp_path / "state"),
        presence_interval_s=0.2,
        peer_timeout_s=1.5,
        torch_threads=1,
    )


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[object]:
    """A JetStream context on the test's server, with the streams created."""
    import nats

    from swarmtrain.common import bus

    nc = await nats.connect(nats_url)
    ctx = nc.jetstream()
    await bus.ensure_streams(ctx)
    yield ctx
    await nc.drain()


@pytest.fixture
async def projector(settings: Settings) -> AsyncIterator[None]:
    """The real projector as a task, with its schema in place, until the test ends."""
    from swarmtrain.projector.service import run

    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop))
    conn = await asyncpg.connect(settings.database_url)

    async def schema_in_place() -> bool:
        assert not task.done(), task.exception()
        return await conn.fetchval("SELECT to_regclass('projection_position')") is not None

    try:
        await wait_for(schema_in_place, "the projector's schema", timeout=30)
    finally:
        await conn.close()
    yield
    stop.set()
    await asyncio.wait_for(task, 15)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts: each one still running at the end is terminated (killed after 30 s)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
