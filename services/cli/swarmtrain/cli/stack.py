"""``swarmtrain up``: the whole platform on one machine, as supervised child processes.

nats-server (JetStream on, fsync before every acknowledgement), an embedded PostgreSQL (unless
SWARMTRAIN_DATABASE_URL is set), a blob folder (unless SWARMTRAIN_BLOB_URL is set), then
projector, scheduler, gateway and N peers. Every child, the two servers included, is restarted
when it dies (the servers from their own store), within a restart budget per time window
(``SWARMTRAIN_RESTART_LIMIT`` restarts within ``SWARMTRAIN_RESTART_WINDOW_S``); SIGINT or SIGTERM
stops everything, services first, servers last. Each child's pid is kept in ``<data-dir>/run``,
its output in ``<data-dir>/logs/<name>.log``: the processes are ``launcher.Launcher``'s, the one
launcher the tests and benchmarks use too.

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

import os
import secrets
import signal
import socket
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from swarmtrain.cli import natsconfig
from swarmtrain.cli.invite import AUTH_DIR, LISTENING, Listening
from swarmtrain.cli.launcher import Launcher, RestartBudget
from swarmtrain.common import servers
from swarmtrain.common.settings import get_settings

WILDCARDS = ("0.0.0.0", "::", "")


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
class Stack:
    peers: int
    port: int
    nats_port: int
    data_dir: Path
    listen: str | None = None
    """``--listen``: the address NATS and the gateway listen on for other machines; None, loopback."""
    advertise: str | None = None
    """``--advertise``: the host other machines reach this one at (see :func:`advertised`)."""
    launcher: Launcher = field(init=False)
    stopping: bool = False
    credentials: natsconfig.StackCredentials | None = None
    metrics: dict[str, int] = field(default_factory=dict)
    """Each process's Prometheus port (on loopback), by child name."""

    def __post_init__(self) -> None:
        settings = get_settings()
        self.launcher = Launcher(
            self.data_dir,
            pid_files=True,
            budget=lambda: RestartBudget(settings.restart_limit, settings.restart_window_s),
        )

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
        store = self.data_dir / "nats"
        config = self._nats_config(store)
        self.launcher.nats(self.nats_port, store=store, config=config, host=self.bind).start()
        env = {"SWARMTRAIN_NATS_URL": f"nats://{url_host(self.local)}:{self.nats_port}"}
        if url := os.environ.get("SWARMTRAIN_DATABASE_URL"):
            env["SWARMTRAIN_DATABASE_URL"] = url
        else:
            pg_port = servers.free_port()
            self.launcher.postgres(pg_port).start()
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
        self.launcher.env = base
        signing = {
            "SWARMTRAIN_BLOB_SIGNING_SECRET": self._secret("SWARMTRAIN_BLOB_SIGNING_SECRET", "blob-signing-secret")
        }
        gateway = {
            **signing,
            **self._identity("gateway"),
            "SWARMTRAIN_HOST": self.bind,
            "SWARMTRAIN_PORT": str(self.port),
            "SWARMTRAIN_JWT_SECRET": self._secret("SWARMTRAIN_JWT_SECRET", "jwt-secret"),
        }
        self.launcher.service("projector", env={**self._identity("projector"), **self._metrics("projector")})
        self.launcher.service("scheduler", env={**signing, **self._identity("scheduler"), **self._metrics("scheduler")})
        self.launcher.service("gateway", env=gateway)
        threads = {"SWARMTRAIN_TORCH_THREADS": base.get("SWARMTRAIN_TORCH_THREADS", "1")}
        for i in range(1, self.peers + 1):
            name = f"peer-{i}"
            args = ["--credentials", str(self.credentials.peers[i - 1])] if self.credentials is not None else []
            self.launcher.peer(name, shared["SWARMTRAIN_NATS_URL"], *args, env={**threads, **self._metrics(name)})

    @property
    def envs(self) -> dict[str, dict[str, str]]:
        """Each service's and peer's environment, by name (as planned)."""
        return {name: p.env for name, p in self.launcher.procs.items() if p.env is not None and not p.server}

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
        """Restart every process that has died, servers first (the services need them)."""
        if not self.stopping:
            self.launcher.supervise(lambda text: print(text, flush=True))

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        servers.ensure_free(self.nats_port, "NATS (--nats-port)")
        servers.ensure_free(self.port, "gateway (--port)")
        try:
            shared = self._start_servers()
            self._plan(shared)
            for proc in self.launcher.procs.values():
                if proc.proc is None:
                    proc.start()
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
        self.launcher.close()
        print("swarmtrain stopped", flush=True)
