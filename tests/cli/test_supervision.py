"""`swarmtrain up` supervises its servers too: nats-server and PostgreSQL killed under it come back
from their own store, and the stack serves /readyz 200 again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import nats
import pytest

from swarmtrain.cli.launcher import SWARMTRAIN, Launcher, RestartBudget
from swarmtrain.common import bus, events, servers

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_the_restart_budget_is_per_window_not_per_lifetime() -> None:
    budget = RestartBudget(limit=3, window_s=60)
    assert all(budget.spend(t) for t in (0, 10, 20))
    assert not budget.spend(30)  # a fourth crash within a minute: a crash loop
    assert budget.spend(60)  # the first crash has left the window
    assert not budget.spend(61)
    # a crash a day, for a week, never runs out
    daily = RestartBudget(limit=5, window_s=60)
    assert all(daily.spend(day * 86_400.0) for day in range(7))


def test_a_stale_postmaster_pid_is_cleared_only_when_its_process_is_gone(tmp_path: Path) -> None:
    lock = tmp_path / "postmaster.pid"
    lock.write_text(f"{os.getpid()}\n{tmp_path}\n")
    assert not servers.clear_stale_pid(tmp_path) and lock.exists()  # a live process holds it
    zombie = subprocess.Popen(["true"])
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # it has exited, and is not reaped yet
    lock.write_text(f"{zombie.pid}\n{tmp_path}\n")
    assert servers.clear_stale_pid(tmp_path) and not lock.exists()  # a zombie holds nothing
    zombie.wait()
    assert not servers.clear_stale_pid(tmp_path)  # no file, nothing to do


class Up:
    """``swarmtrain up --peers 0`` with its embedded PostgreSQL, in a session of its own (the launcher's)."""

    def __init__(self, data_dir: Path) -> None:
        self.port, self.nats_port = servers.free_port(), servers.free_port()
        self.data_dir = data_dir
        env = {k: v for k, v in os.environ.items() if k != "SWARMTRAIN_DATABASE_URL"}  # the embedded one
        self.launcher = Launcher(data_dir.parent / "up", env=env)
        argv = ["up", "--peers", "0", "--port", str(self.port), "--nats-port", str(self.nats_port)]
        self.up = self.launcher.command("up", [*SWARMTRAIN, *argv, "--data-dir", str(data_dir)], new_session=True)
        self.up.start()

    def pid(self, name: str) -> int:
        return int((self.data_dir / "run" / f"{name}.pid").read_text())

    def ready(self) -> dict[str, object] | None:
        assert self.up.alive(), self.launcher.tail("up")
        try:
            resp = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)
        except httpx.HTTPError:
            return None
        body: dict[str, object] = resp.json()
        return body if resp.status_code == 200 else None

    def kill(self, name: str) -> int:
        """SIGKILL one of the stack's servers; wait until the stack has started another."""
        old = self.pid(name)
        os.kill(old, signal.SIGKILL)
        return wait_for(lambda: (new := self.pid(name)) != old and new, 60, f"{name} to be restarted")

    def stop(self) -> list[str]:
        return self.up.stop_group()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    stack = Up(tmp_path / "data")
    try:
        yield stack
    finally:
        assert not stack.stop(), "swarmtrain up left processes behind"


async def _append_and_count(url: str) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await bus.append(js, events.PeerWentOnline(peer_id="p-supervised"))
        return await bus.last_sequence(js)
    finally:
        await nc.drain()


@pytest.mark.timeout(240)
def test_nats_and_postgres_killed_under_up_come_back_from_their_store(up: Up) -> None:
    wait_for(up.ready, 120, "the stack to be ready")
    nats_url = f"nats://127.0.0.1:{up.nats_port}"
    # NATS fsyncs before it acknowledges: the configuration `up` runs it with says so
    cmdline = Path(f"/proc/{up.pid('nats-server')}/cmdline").read_bytes().split(b"\0")
    config = Path(cmdline[cmdline.index(b"-c") + 1].decode())
    assert "sync_interval: always" in config.read_text()
    before = asyncio.run(_append_and_count(nats_url))

    up.kill("nats-server")
    ready = wait_for(up.ready, 60, "/readyz after nats-server came back")
    assert isinstance(ready["stream_last_seq"], int) and ready["stream_last_seq"] >= before  # the store kept it
    assert asyncio.run(_append_and_count(nats_url)) == before + 1

    pg_dir = up.data_dir / "postgres"
    up.kill("postgres")
    wait_for(up.ready, 60, "/readyz after postgres came back")
    assert int((pg_dir / "postmaster.pid").read_text().split()[0]) == up.pid("postgres")
    log = up.launcher.log("up").read_text()
    assert "nats-server exited with -9; restarting" in log and "postgres exited with -9; restarting" in log
