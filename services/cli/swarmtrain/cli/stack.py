"""``swarmtrain up``: the whole platform on one machine, as supervised child processes.

nats-server (JetStream on, fsync before every acknowledgement), an embedded PostgreSQL (unless
SWARMTRAIN_DATABASE_URL is set), a blob folder (unless SWARMTRAIN_BLOB_URL is set), then
projector, scheduler, gateway and N peers. Every child, the two servers included, is restarted
when it dies (the servers from their own store), within a restart budget per time window
(``SWARMTRAIN_RESTART_LIMIT`` restarts within ``SWARMTRAIN_RESTART_WINDOW_S``); SIGINT or SIGTERM
stops everything, services first, servers last. Each child's pid is kept in ``<data-dir>/run``.

Peers get every blob as an object-scoped, expiring URL signed for the gateway's ``/blobs`` routes:
the stack makes a signing secret of its own (``<data-dir>/blob-signing-secret``, unless
SWARMTRAIN_BLOB_SIGNING_SECRET is set) and points SWARMTRAIN_BLOB_PUBLIC_URL at its gateway. Its
peers hold no storage location, no database URL and no secret.

``--listen ADDRESS`` lets other machines join (``swarmtrain invite``): NATS and the gateway listen
on ADDRESS, and NATS authenticates every process by its own nkey with least-privilege permissions
(``swarmtrain nats-config``'s, kept in ``<data-dir>/nats-auth``). A data folder that once ran with
authentication keeps it (its streams live in the authenticated account), loopback only when started
without ``--listen``; one whose streams were made without cannot be switched on.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from swarmtrain.cli import natsconfig
from swarmtrain.cli.invite import AUTH_DIR, LISTENING, Listening
from swarmtrain.common import servers
from swarmtrain.common.settings import get_settings

WILDCARDS = ("0.0.0.0", "::", "")
PEER_WITHHELD = (
    "SWARMTRAIN_DATABASE_URL",
    "SWARMTRAIN_BLOB_URL",
    "SWARMTRAIN_BLOB_SIGNING_SECRET",
    "SWARMTRAIN_JWT_SECRET",
    "SWARMTRAIN_S3_ACCESS_KEY",
    "SWARMTRAIN_S3_SECRET_KEY",
    "SWARMTRAIN_NATS_USER",
    "SWARMTRAIN_NATS_PASSWORD",
    "SWARMTRAIN_NATS_NKEY_SEED",
)
"""What a local peer is not given: it reaches blobs through signed URLs only, as a remote one does."""


def url_host(host: str) -> str:
    """``host`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def primary_address() -> str:
    """This machine's address on its default route (a UDP socket's local end after ``connect``,
    which sends nothing), or its host name where it has no route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the routing table is consulted
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostname()


def advertised(listen: str | None, advertise: str | None) -> str:
    """The host other machines reach the stack at: ``--advertise``, else the listen address, else
    (a wildcard) this machine's primary address; loopback for a stack that does not listen."""
    if advertise:
        return advertise
    if listen is None:
        return "127.0.0.1"
    return primary_address() if listen in WILDCARDS else listen


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
    listen: str | None = None
    """``--listen``: the address NATS and the gateway listen on for other machines; None, loopback."""
    advertise: str | None = None
    """``--advertise``: the host other machines reach this one at (see :func:`advertised`)."""
    servers: list[Child] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    credentials: natsconfig.StackCredentials | None = None
    metrics: dict[str, int] = field(default_factory=dict)
    """Each process's Prometheus port (on loopback), by child name."""
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    """Each service's and peer's environment, by child name (as planned)."""

    @property
    def bind(self) -> str:
        return self.listen if self.listen is not None else "127.0.0.1"

    @property
    def local(self) -> str:
        """Where the stack's own processes reach NATS and the gateway."""
        return servers.local_host(self.bind)

    @property
    def public(self) -> str:
        return url_host(advertised(self.listen, self.advertise))

    @property
    def auth_dir(self) -> Path:
        return self.data_dir / AUTH_DIR

    def _secret(self, variable: str, filename: str) -> str:
        """``variable`` from the environment, else a throwaway secret of this stack's own
        (``<data-dir>/<filename>``, 0600, kept across restarts)."""
        if secret := os.environ.get(variable):
            return secret
        path = self.data_dir / filename
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
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

    def _nats_config(self, store: Path) -> Path:
        """The durable configuration; with authentication, ``nats-config``'s (fsync before every ack too)."""
        secured = self.auth_dir.exists()
        if self.listen is not None and not secured and store.exists():
            raise RuntimeError(
                f"{self.data_dir} holds streams made without NATS authentication, which --listen turns on "
                "(they would be out of the authenticated account's reach): use a new --data-dir"
            )
        if self.listen is None and not secured:
            return servers.write_durable_nats_config(self.data_dir / "nats.conf")
        self.credentials = natsconfig.stack_credentials(self.auth_dir, self.peers, self.nats_port)
        return self.credentials.config

    def _start_servers(self) -> dict[str, str]:
        logs = self.data_dir / "logs"
        store = self.data_dir / "nats"
        config = self._nats_config(store)
        nats = self._child(
            "nats-server",
            lambda: servers.start_nats(self.nats_port, store, logs / "nats-server.log", config, host=self.bind),
        )
        self.servers.append(nats)
        nats.start()
        env = {"SWARMTRAIN_NATS_URL": f"nats://{url_host(self.local)}:{self.nats_port}"}
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

    @property
    def gateway_url(self) -> str:
        return f"http://{self.public}:{self.port}"

    def _metrics(self, name: str) -> dict[str, str]:
        self.metrics[name] = servers.free_port()
        return {"SWARMTRAIN_METRICS_PORT": str(self.metrics[name]), "SWARMTRAIN_METRICS_HOST": "127.0.0.1"}

    def _identity(self, name: str) -> dict[str, str]:
        return self.credentials.services[name] if self.credentials is not None else {}

    def _plan(self, shared: dict[str, str]) -> None:
        base = {**os.environ, **shared}
        # every blob a peer reads or writes is a URL the scheduler signs and the gateway honours
        base["SWARMTRAIN_BLOB_PUBLIC_URL"] = os.environ.get("SWARMTRAIN_BLOB_PUBLIC_URL") or self.gateway_url
        base.setdefault("SWARMTRAIN_LOG_FORMAT", "json")
        base.setdefault("SWARMTRAIN_BLOB_PUBLIC_URL", f"http://127.0.0.1:{self.port}")
        base["SWARMTRAIN_STATE_DIR"] = str(self.data_dir / "state")
        me = [sys.executable, "-m", "swarmtrain.cli.main"]
        logs = self.data_dir / "logs"
        signing = {
            "SWARMTRAIN_BLOB_SIGNING_SECRET": self._secret("SWARMTRAIN_BLOB_SIGNING_SECRET", "blob-signing-secret")
        }
        gateway_env = {
            **base,
            **signing,
            **self._identity("gateway"),
            "SWARMTRAIN_HOST": self.bind,
            "SWARMTRAIN_PORT": str(self.port),
            "SWARMTRAIN_JWT_SECRET": self._secret("SWARMTRAIN_JWT_SECRET", "jwt-secret"),
        }
        for name, env in (
            ("projector", {**base, **self._identity("projector"), **self._metrics("projector")}),
            ("scheduler", {**base, **signing, **self._identity("scheduler"), **self._metrics("scheduler")}),
            ("gateway", gateway_env),
        ):
            self.envs[name] = env
            self.children.append(self._child(name, _service([*me, name], env, logs / f"{name}.log")))
        peer_base = {k: v for k, v in base.items() if k not in PEER_WITHHELD}
        peer_base["SWARMTRAIN_TORCH_THREADS"] = base.get("SWARMTRAIN_TORCH_THREADS", "1")
        for i in range(1, self.peers + 1):
            name = f"peer-{i}"
            argv = [*me, "peer", "--nats", shared["SWARMTRAIN_NATS_URL"], "--name", name]
            if self.credentials is not None:
                argv += ["--credentials", str(self.credentials.peers[i - 1])]
            env = {**peer_base, **self._metrics(name)}
            self.envs[name] = env
            self.children.append(self._child(name, _service(argv, env, logs / f"{name}.log")))

    def _announce(self, shared: dict[str, str]) -> None:
        """Where everything is: the gateway, its dashboard and API docs, NATS, the metrics, the logs."""
        gateway = f"http://{url_host(self.local)}:{self.port}" if self.listen is None else self.gateway_url
        nats = shared["SWARMTRAIN_NATS_URL"] if self.listen is None else f"nats://{self.public}:{self.nats_port}"
        auth = "on" if self.credentials is not None else "off"
        where = f"listening on {self.listen} for other machines" if self.listen is not None else "loopback only"
        metrics = "\n".join(f"    {name:<10} http://127.0.0.1:{port}/metrics" for name, port in self.metrics.items())
        lines = [
            f"swarmtrain is up ({where}; NATS authentication {auth}), peers {self.peers}",
            f"  dashboard  {gateway}/ui/",
            f"  gateway    {gateway}   API docs {gateway}/schema",
            f"  nats       {nats}",
            f"  metrics    {gateway}/metrics/prometheus (gateway)",
            metrics,
            f"  logs       {self.data_dir / 'logs'}",
        ]
        if self.listen is not None:
            lines.append(
                f"  another machine joins with the line printed by: swarmtrain invite --data-dir {self.data_dir}"
            )
        lines.append("  Ctrl-C stops everything.")
        print("\n".join(line for line in lines if line), flush=True)

    def _write_listening(self) -> None:
        path = self.data_dir / LISTENING
        if self.listen is None:
            path.unlink(missing_ok=True)
            return
        listening = Listening(
            nats=[f"nats://{self.public}:{self.nats_port}"],
            local_nats=f"nats://{url_host(self.local)}:{self.nats_port}",
            gateway=self.gateway_url,
            nats_port=self.nats_port,
        )
        path.write_bytes(msgspec.json.encode(listening))

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            try:
                with urllib.request.urlopen(f"http://{url_host(self.local)}:{self.port}/healthz", timeout=1) as resp:
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
                self._write_listening()
                self._announce(shared)
            while not self.stopping:
                self._supervise()
                time.sleep(0.5)
        finally:
            self.stopping = True
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        (self.data_dir / LISTENING).unlink(missing_ok=True)  # no invite for a stack that is gone
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
