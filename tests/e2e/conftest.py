"""A real `swarmtrain up` stack as processes, shared by the end-to-end tests of one module."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pytest

from swarmtrain.common import servers

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.csv"
T = TypeVar("T")


def wait_for(check: Callable[[], T | Literal[False] | None], timeout: float, what: str, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Stack:
    def __init__(self, data_dir: Path, database_url: str, peers: int) -> None:
        self.port, self.nats_port = servers.free_port(), servers.free_port()
        self.data_dir = data_dir
        self.log = (data_dir / "up.log").open("wb")
        self.env = {
            **os.environ,
            "SWARMTRAIN_DATABASE_URL": database_url,
            "SWARMTRAIN_NATS_URL": f"nats://127.0.0.1:{self.nats_port}",
            "SWARMTRAIN_PRESENCE_INTERVAL_S": "0.3",
            "SWARMTRAIN_PEER_TIMEOUT_S": "2.0",
            "SWARMTRAIN_LOG_LEVEL": "debug",
        }
        cmd = [
            sys.executable,
            "-m",
            "swarmtrain.cli.main",
            "up",
            "--peers",
            str(peers),
            "--port",
            str(self.port),
            "--nats-port",
            str(self.nats_port),
            "--data-dir",
            str(data_dir / "data"),
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.extra: list[subprocess.Popen[bytes]] = []

    def logs(self) -> str:
        out = []
        for path in sorted((self.data_dir / "data" / "logs").glob("*.log")):
            out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"swarmtrain up exited:\n{self.logs()}"
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, "the gateway")

    def start_peer(self, name: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarmtrain.cli.main", "peer", "--nats", self.nats_url, "--name", name],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**self.env, "SWARMTRAIN_STATE_DIR": str(self.data_dir / "x")},
        )
        self.extra.append(proc)
        return proc

    def stop(self) -> list[str]:
        """SIGINT the stack's process group; returns the pids still alive afterwards."""
        for proc in self.extra:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        left = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        if left:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        return left


class Api:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)

    def signup(self) -> str:
        email, password = f"u{uuid.uuid4().hex[:10]}@example.org", "correct horse battery staple"
        assert self.client.post("/auth/signup", json={"email": email, "password": password}).status_code == 201
        resp = self.client.post("/auth/signin", json={"email": email, "password": password})
        assert resp.status_code == 200, resp.text
        self.client.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
        return email

    def upload(self, path: Path = DIGITS) -> dict[str, Any]:
        with path.open("rb") as f:
            resp = self.client.post("/datasets", files={"file": (path.name, f, "text/csv")})
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def peers(self) -> list[dict[str, Any]]:
        resp = self.client.get("/peers")
        assert resp.status_code == 200, resp.text
        body: list[dict[str, Any]] = resp.json()
        return body

    def wait_idle_peers(self, n: int) -> list[dict[str, Any]]:
        return wait_for(
            lambda: (p := [x for x in self.peers() if x["status"] == "online"]) and len(p) >= n and p,
            90,
            f"{n} idle peers",
        )

    def session(self, sid: str) -> dict[str, Any]:
        resp = self.client.get(f"/sessions/{sid}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def wait_ended(self, sid: str, timeout: float = 180) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.session(sid))["status"] in ("completed", "failed", "cancelled") and s,
            timeout,
            f"session {sid} to end",
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres_port: int) -> Iterator[Stack]:
    name = f"e2e{uuid.uuid4().hex[:8]}"
    servers.create_database(postgres_port, name)
    st = Stack(tmp_path_factory.mktemp("stack"), servers.postgres_url(postgres_port, name), peers=3)
    try:
        st.wait_healthy()
        yield st
    finally:
        left = st.stop()
        assert not left, f"swarmtrain up left processes behind: {left}"


@pytest.fixture
def api(stack: Stack) -> Iterator[Api]:
    client = Api(stack.url)
    client.signup()
    yield client
    client.client.close()
