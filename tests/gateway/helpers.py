"""Helpers shared by the gateway tests."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import msgspec
from litestar import Litestar

from swarmtrain.common.settings import Settings
from tests.support import wait_for

Client = httpx.AsyncClient
Headers = dict[str, str]
T = TypeVar("T")


async def sign_up_and_in(client: Client, email: str, password: str = "correct horse battery") -> Headers:
    r = await client.post("/auth/signup", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    r = await client.post("/auth/signin", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def to_csv(rows: list[list[Any]], header: list[str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def small_csv(rows: int = 12, classes: int = 2) -> bytes:
    """Two numeric features and a string label."""
    return to_csv([[i, i * 0.5, f"c{i % classes}"] for i in range(rows)], ["a", "b", "label"])


async def upload(client: Client, headers: Headers, data: bytes, **form: str) -> Any:
    return await client.post("/datasets", files={"file": ("data.csv", data, "text/csv")}, data=form, headers=headers)


HP: dict[str, Any] = {"epochs": 2, "batch_size": 32, "lr": 0.01}


def stored_objects(blob_dir: Path) -> list[Path]:
    """Every object in a file:// blob store."""
    return sorted(p for p in blob_dir.rglob("*") if p.is_file())


@contextlib.asynccontextmanager
async def running(app: Litestar) -> AsyncIterator[None]:
    """The app's lifespan, entered and left in one task of its own (anyio's cancel scopes must be left
    by the task that entered them; a pytest-asyncio fixture tears down in another)."""
    started, stop = asyncio.Event(), asyncio.Event()

    async def lifespan() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(lifespan())
    ready = asyncio.create_task(started.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises the startup error
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def serving(app: Litestar) -> AsyncIterator[Client]:
    """The running app and an httpx client straight into it, on the test's own event loop
    (``AsyncTestClient`` would run the lifespan on a portal thread's loop, away from the requests)."""
    transport = httpx.ASGITransport(app=cast(Any, app))
    async with running(app), httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        yield client


@contextlib.asynccontextmanager
async def live(settings: Settings) -> AsyncIterator[str]:
    """The gateway served by ``run`` (uvicorn) on a free port: real HTTP, for what ASGI in-process
    cannot show (a response streamed while the client reads it). Yields the base URL."""
    from swarmtrain.common import servers
    from swarmtrain.gateway import run

    port = servers.free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(run(msgspec.structs.replace(settings, port=port), stop))
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            await wait_for(lambda: healthy(http, task), "the gateway to answer /healthz", timeout=30)
        yield base
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def healthy(http: httpx.AsyncClient, task: asyncio.Task[None]) -> bool:
    """Whether the gateway served by ``task`` answers ``/healthz`` (its startup error, if it died)."""
    assert not task.done(), task.exception()
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


def blocking(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` (the test's, serving the app) from a worker thread and wait for it:
    how a synchronous driver (hypothesis, schemathesis) talks to the app under test."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)


async def sse_frames(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Server-Sent Events messages (``{"id": ..., "event": ..., "data": ...}``); comments and
    ``retry`` advice left out."""
    frame: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in frame or "event" in frame:
                yield frame
            frame = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            frame[name] = value.removeprefix(" ")
