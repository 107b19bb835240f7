"""``swarmtrain up``: the whole platform on one machine, as supervised child processes.

nats-server (JetStream on, fsync before every acknowledgement), an embedded PostgreSQL (unless
SWARMTRAIN_DATABASE_URL is set), a blob folder (unless SWARMTRAIN_BLOB_URL is set), then
projector, scheduler, gateway and N peers. Every child, the two servers included, is restarted
when it dies (the servers from their own store), within a restart budget per time window
(``SWARMTRAIN_RESTART_LIMIT`` restarts within ``SWARMTRAIN_RESTART_WINDOW_S``); SIGINT or SIGTERM
stops everything, services first, servers last. Each child's pid is kept in ``<data-dir>/run``.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swarmtrain.common import servers
from swarmtrain.common.settings import get_settings


@dataclass
class RestartBudget:
    """At most ``limit`` restarts within any ``window_s`` seconds: a crash loop stops the stack, a
    crash a day does not."""

    limit: int
    window_s: float
    times: collections.deque[float] = field(default_factory=collections.deque)

    def spend(self, now: float) -> bool:
        """Take one restart at ``now`` if the window has one left; False if it has none."""
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


@dataclass
class Child:
    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    log: Path
    budget: RestartBudget
    stop_signal: int = signal.SIGTERM
    pid_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        self.proc = self.launch()
        if self.pid_file is not None:
            self.pid_file.write_text(f"{self.proc.pid}\n")

    def stop(self) -> None:
        if self.proc is not None:
            servers.stop(self.proc, self.stop_signal)


def _service(argv: list[str], env: dict[str, str], log: Path) -> Callable[[], subprocess.Popen[bytes]]:
    def launch() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    return launch


@dataclass
class Stack:
    peers: int
    port: int
    nats_port: int
    data_dir: Path
    servers: list[Child] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def _secret(self, env: str = "SWARMTRAIN_JWT_SECRET", file: str = "jwt-secret") -> str:
        if secret := os.environ.get(env):
            return secret
        path = self.data_dir / file  # a throwaway secret for this local stack only
        if not path.exists():
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()

    def _child(self, name: str, launch: Callable[[], subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> Child:
        settings = get_settings()
        return Child(
            name,
            launch,
            self.data_dir / "logs" / f"{name}.log",
            RestartBudget(settings.restart_limit, settings.restart_window_s),
            stop_signal=sig,
            pid_file=self.data_dir / "run" / f"{name}.pid",
        )

    def _start_servers(self) -> dict[str, str]:
        logs = self.data_dir / "logs"
        config = servers.write_durable_nats_config(self.data_dir / "nats.conf")
        store = self.data_dir / "nats"
        nats = self._child(
            "nats-server", lambda: servers.start_nats(self.nats_port, store, logs / "nats-server.log", config)
        )
        self.servers.append(nats)
        nats.start()
        env = {"SWARMTRAIN_NATS_URL": f"nats://127.0.0.1:{self.nats_port}"}
        if url := os.environ.get("SWARMTRAIN_DATABASE_URL"):
            env["SWARMTRAIN_DATABASE_URL"] = url
        else:
            pg_port, pg_dir = servers.free_port(), self.data_dir / "postgres"
            # SIGINT: PostgreSQL's fast shutdown
            pg = self._child(
                "postgres", lambda: servers.start_postgres(pg_dir, pg_port, logs / "postgres.log"), signal.SIGINT
            )
            self.servers.append(pg)
            pg.start()
            env["SWARMTRAIN_DATABASE_URL"] = servers.postgres_url(pg_port)
        env["SWARMTRAIN_BLOB_URL"] = os.environ.get("SWARMTRAIN_BLOB_URL") or (self.data_dir / "blobs").as_uri()
        return env

    def _plan(self, shared: dict[str, str]) -> None:
        base = {**os.environ, **shared}
        base.setdefault("SWARMTRAIN_LOG_FORMAT", "json")
        base.setdefault("SWARMTRAIN_BLOB_PUBLIC_URL", f"http://127.0.0.1:{self.port}")
        base["SWARMTRAIN_STATE_DIR"] = str(self.data_dir / "state")
        me = [sys.executable, "-m", "swarmtrain.cli.main"]
        logs = self.data_dir / "logs"
        # peers hold no storage key: the scheduler signs the URLs they use and the gateway honours
        # them, with a secret only those two know
        signer = {"SWARMTRAIN_BLOB_SIGNING_SECRET": self._secret("SWARMTRAIN_BLOB_SIGNING_SECRET", "blob-secret")}
        for secret in ("SWARMTRAIN_BLOB_SIGNING_SECRET", "SWARMTRAIN_JWT_SECRET"):  # never in a peer's environment
            base.pop(secret, None)
        gateway_env = {**base, **signer, "SWARMTRAIN_PORT": str(self.port), "SWARMTRAIN_JWT_SECRET": self._secret()}
        for name, env in (("projector", base), ("scheduler", {**base, **signer}), ("gateway", gateway_env)):
            self.children.append(self._child(name, _service([*me, name], env, logs / f"{name}.log")))
        peer_env = {**base, "SWARMTRAIN_TORCH_THREADS": base.get("SWARMTRAIN_TORCH_THREADS", "1")}
        for i in range(1, self.peers + 1):
            argv = [*me, "peer", "--nats", shared["SWARMTRAIN_NATS_URL"], "--name", f"peer-{i}"]
            self.children.append(self._child(f"peer-{i}", _service(argv, peer_env, logs / f"peer-{i}.log")))

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
            self._supervise()
        if not self.stopping:
            raise RuntimeError(f"gateway not healthy after {timeout:.0f}s; see {self.data_dir / 'logs'}")

    def _supervise(self) -> None:
        """Restart every child that has died, servers first (the services need them)."""
        for child in (*self.servers, *self.children):
            assert child.proc is not None
            code = child.proc.poll()  # also reaps it: a zombie postmaster would block its restart
            if code is None or self.stopping:
                continue
            print(f"swarmtrain: {child.name} exited with {code}; restarting", flush=True)
            while True:
                if not child.budget.spend(time.monotonic()):
                    raise RuntimeError(
                        f"{child.name} died {child.budget.limit + 1} times within {child.budget.window_s:.0f}s"
                        f" (last exit {code}); see {child.log}"
                    )
                child.restarts += 1
                try:
                    child.start()
                    break
                except RuntimeError as exc:  # a server that could not start again: try again, within budget
                    print(f"swarmtrain: {child.name} did not start: {exc}", flush=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        for folder in ("logs", "run"):
            (self.data_dir / folder).mkdir(parents=True, exist_ok=True)
        servers.ensure_free(self.nats_port, "NATS (--nats-port)")
        servers.ensure_free(self.port, "gateway (--port)")
        try:
            shared = self._start_servers()
            self._plan(shared)
            for child in self.children:
                child.start()
            self._wait_healthy()
            if not self.stopping:
                print(
                    f"swarmtrain is up: gateway http://127.0.0.1:{self.port}  nats {shared['SWARMTRAIN_NATS_URL']}"
                    f"  peers {self.peers}\n  API docs http://127.0.0.1:{self.port}/schema"
                    f"  logs {self.data_dir / 'logs'}\n  Ctrl-C stops everything.",
                    flush=True,
                )
            while not self.stopping:
                self._supervise()
                time.sleep(0.5)
        finally:
            self.stopping = True
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in reversed(self.servers):
            child.stop()
        for child in (*self.servers, *self.children):
            if child.pid_file is not None:
                child.pid_file.unlink(missing_ok=True)
        print("swarmtrain stopped", flush=True)
