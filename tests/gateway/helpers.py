"""Helpers shared by the gateway tests."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
from litestar import Litestar

Client = httpx.AsyncClient
Headers = dict[str, str]


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
