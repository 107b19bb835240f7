"""``swarmtrain up``: the whole platform on one machine, as supervised child processes.

nats-server (JetStream on), an embedded PostgreSQL (unless SWARMTRAIN_DATABASE_URL is set), a blob
folder (unless SWARMTRAIN_BLOB_URL is set), then projector, scheduler, gateway and N peers. A child
that dies is restarted; SIGINT or SIGTERM stops everything, services first, servers last.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from swarmtrain.common import servers

RESTART_LIMIT = 5


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)


@dataclass
class Stack:
    peers: int
    port: int
    nats_port: int
    data_dir: Path
    children: list[Child] = field(default_factory=list)
    servers: list[tuple[subprocess.Popen[bytes], int]] = field(default_factory=list)
    stopping: bool = False

    def _secret(self) -> str:
        if secret := os.environ.get("SWARMTRAIN_JWT_SECRET"):
            return secret
        path = self.data_dir / "jwt-secret"  # a throwaway secret for this local stack only
        if not path.exists():
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()

    def _start_servers(self) -> dict[str, str]:
        logs = self.data_dir / "logs"
        nats = servers.start_nats(self.nats_port, self.data_dir / "nats", logs / "nats.log")
        self.servers.append((nats, signal.SIGTERM))
        env = {"SWARMTRAIN_NATS_URL": f"nats://127.0.0.1:{self.nats_port}"}
        if url := os.environ.get("SWARMTRAIN_DATABASE_URL"):
            env["SWARMTRAIN_DATABASE_URL"] = url
        else:
            pg_port = servers.free_port()
            pg = servers.start_postgres(self.data_dir / "postgres", pg_port, logs / "postgres.log")
            self.servers.append((pg, signal.SIGINT))  # SIGINT: PostgreSQL's fast shutdown
            env["SWARMTRAIN_DATABASE_URL"] = servers.postgres_url(pg_port)
        env["SWARMTRAIN_BLOB_URL"] = os.environ.get("SWARMTRAIN_BLOB_URL") or (self.data_dir / "blobs").as_uri()
        return env

    def _plan(self, shared: dict[str, str]) -> None:
        base = {**os.environ, **shared}
        base.setdefault("SWARMTRAIN_LOG_FORMAT", "json")
        base["SWARMTRAIN_STATE_DIR"] = str(self.data_dir / "state")
        me = [sys.executable, "-m", "swarmtrain.cli.main"]
        logs = self.data_dir / "logs"
        gateway_env = {**base, "SWARMTRAIN_PORT": str(self.port), "SWARMTRAIN_JWT_SECRET": self._secret()}
        for name, env in (("projector", base), ("scheduler", base), ("gateway", gateway_env)):
            self.children.append(Child(name, [*me, name], env, logs / f"{name}.log"))
        peer_env = {**base, "SWARMTRAIN_TORCH_THREADS": base.get("SWARMTRAIN_TORCH_THREADS", "1")}
        for i in range(1, self.peers + 1):
            argv = [*me, "peer", "--nats", shared["SWARMTRAIN_NATS_URL"], "--name", f"peer-{i}"]
            self.children.append(Child(f"peer-{i}", argv, peer_env, logs / f"peer-{i}.log"))

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
        for child in self.children:
            assert child.proc is not None
            code = child.proc.poll()
            if code is None or self.stopping:
                continue
            if child.restarts >= RESTART_LIMIT:
                raise RuntimeError(f"{child.name} keeps dying (exit {code}); see {child.log}")
            child.restarts += 1
            print(f"swarmtrain: {child.name} exited with {code}; restarting ({child.restarts})", flush=True)
            child.start()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
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
        for proc, sig in reversed(self.servers):
            servers.stop(proc, sig)
        print("swarmtrain stopped", flush=True)
