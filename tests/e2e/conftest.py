"""A real `swarmtrain up` stack as processes, shared by the end-to-end tests of one module."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from swarmtrain.cli.launcher import SWARMTRAIN, Launcher
from swarmtrain.common import servers
from swarmtrain.common.status import SESSION_TERMINAL
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.csv"


async def cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """``swarmtrain <args>`` as a process: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarmtrain.cli.main",
        *args,
        env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Stack:
    """``swarmtrain up`` as a process (in a session of its own) and the peers a test adds, started by
    ``launcher.Launcher`` under ``data_dir`` (their logs in ``data_dir/logs``, the stack's own in
    ``data_dir/data/logs``)."""

    def __init__(self, data_dir: Path, database_url: str, peers: int, env: Mapping[str, str] | None = None) -> None:
        self.port, self.nats_port = servers.free_port(), servers.free_port()
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "SWARMTRAIN_DATABASE_URL": database_url,
            "SWARMTRAIN_NATS_URL": f"nats://127.0.0.1:{self.nats_port}",
            "SWARMTRAIN_PRESENCE_INTERVAL_S": "0.3",
            "SWARMTRAIN_PEER_TIMEOUT_S": "2.0",
            "SWARMTRAIN_LOG_LEVEL": "debug",
            # the stack's store, named for the CLI commands a test runs beside it (replay-round)
            "SWARMTRAIN_BLOB_URL": (data_dir / "data" / "blobs").as_uri(),
            # no blob signing secret nor public URL: `swarmtrain up` makes its own, as for a user
            **(env or {}),
        }
        self.launcher = Launcher(data_dir, env=self.env)
        up = ["up", "--peers", str(peers), "--port", str(self.port), "--nats-port", str(self.nats_port)]
        self.up = self.launcher.command(
            "up", [*SWARMTRAIN, *up, "--data-dir", str(data_dir / "data")], new_session=True
        )
        proc = self.up.start().proc
        assert proc is not None
        self.proc: subprocess.Popen[bytes] = proc
        self.url = f"http://127.0.0.1:{self.port}"
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"

    def logs(self) -> str:
        out = [self.launcher.all_logs()]
        for path in sorted((self.data_dir / "data" / "logs").glob("*.log")):
            out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    async def wait_healthy(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=1) as client:

            async def healthy() -> bool:
                assert self.proc.poll() is None, f"swarmtrain up exited:\n{self.logs()}"
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_for(healthy, "the gateway", timeout=120, interval=0.2)

    def start_peer(self, name: str) -> subprocess.Popen[bytes]:
        """One more peer of the stack (the launcher's peer: no database URL, store or secret)."""
        proc = self.launcher.peer(name, self.nats_url, env={"SWARMTRAIN_STATE_DIR": str(self.data_dir / "x")}).start()
        assert proc.proc is not None
        return proc.proc

    def stop(self) -> list[str]:
        """SIGINT the stack's process group; returns the pids still alive afterwards."""
        for name, proc in self.launcher.procs.items():
            if name != "up" and proc.alive():
                proc.kill()
        return self.up.stop_group()


class Api:
    """A signed-in REST client of a running stack."""

    def __init__(self, url: str) -> None:
        self.client = httpx.AsyncClient(base_url=url, timeout=30)

    async def signup(self) -> str:
        email, password = f"u{uuid.uuid4().hex[:10]}@example.org", "correct horse battery staple"
        resp = await self.client.post("/auth/signup", json={"email": email, "password": password})
        assert resp.status_code == 201, resp.text
        resp = await self.client.post("/auth/signin", json={"email": email, "password": password})
        assert resp.status_code == 200, resp.text
        self.client.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
        return email

    async def upload(self, path: Path = DIGITS) -> dict[str, Any]:
        data = await asyncio.to_thread(path.read_bytes)
        resp = await self.client.post("/datasets", files={"file": (path.name, data, "text/csv")})
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def peers(self) -> list[dict[str, Any]]:
        resp = await self.client.get("/peers")
        assert resp.status_code == 200, resp.text
        body: list[dict[str, Any]] = resp.json()
        return body

    async def online(self) -> list[dict[str, Any]]:
        return [p for p in await self.peers() if p["status"] == "online"]

    async def wait_idle_peers(self, n: int, timeout: float = 90) -> list[dict[str, Any]]:
        async def enough() -> list[dict[str, Any]] | None:
            online = await self.online()
            return online if len(online) >= n else None

        return await wait_for(enough, f"{n} idle peers", timeout=timeout, interval=0.2)

    async def session(self, sid: str) -> dict[str, Any]:
        resp = await self.client.get(f"/sessions/{sid}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def wait_started(self, sid: str) -> dict[str, Any]:
        async def started() -> dict[str, Any] | None:
            session = await self.session(sid)
            return session if session["peers"] else None

        return await wait_for(started, f"session {sid} to start", timeout=30, interval=0.2)

    async def wait_ended(self, sid: str, timeout: float = 180) -> dict[str, Any]:
        async def ended() -> dict[str, Any] | None:
            session = await self.session(sid)
            return session if session["status"] in SESSION_TERMINAL else None

        return await wait_for(ended, f"session {sid} to end", timeout=timeout, interval=0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, postgres_port: int) -> AsyncIterator[Stack]:
    name = f"e2e{uuid.uuid4().hex[:8]}"
    servers.create_database(postgres_port, name)
    st = Stack(tmp_path_factory.mktemp("stack"), servers.postgres_url(postgres_port, name), peers=3)
    try:
        await st.wait_healthy()
        yield st
    finally:
        left = st.stop()
        assert not left, f"swarmtrain up left processes behind: {left}"


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    client = Api(stack.url)
    await client.signup()
    yield client
    await client.client.aclose()
