"""The platform as real processes on free ports, each with its own data folder, and the means to hurt
them: SIGKILL, SIGSTOP/SIGCONT, restart, and a TCP proxy that partitions a peer from NATS.

nats-server (fsync before ack, or a three-node cluster), PostgreSQL, projector, scheduler, gateway
and N peers, each a child of the test process started by ``swarmtrain.cli.launcher`` (the launcher
``swarmtrain up`` uses), so a fault is a signal to one pid. A tap process
records every publish to the streams and the acknowledgement it got (see tap.py): what each
producer was told is stored is what the checker holds the platform to.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from swarmtrain.cli.launcher import SWARMTRAIN, Launcher, Process
from swarmtrain.common import servers
from swarmtrain.common.status import SESSION_TERMINAL
from tests.factories import session_body

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.csv"
T = TypeVar("T")

PRESENCE_INTERVAL_S = 0.3
PEER_TIMEOUT_S = 2.0
SHAPE: dict[str, Any] = {"model": {"kind": "mlp", "hidden": [32]}, "validation_split": 0.2, "seed": 7}
"""The model, split and seed of every session of the fault suite."""
SESSION_BOUND_S = 60.0
"""Every session of the fault suite ends within this after its fault, or the test fails."""


def wait_for(check: Callable[[], T | Literal[False] | None], timeout: float, what: str, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


Proc = Process
"""One process of the stack, the launcher's: started, killed, paused, resumed and restarted by name."""


class TcpProxy:
    """127.0.0.1:<port> forwarded to ``target``; ``cut()`` drops every connection and refuses new
    ones until ``heal()``: a network partition of whoever dials through it."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self.closing = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open.clear()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def heal(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.closing = True
        self.cut()
        self.listener.close()


@dataclass
class FaultStack:
    """The whole platform as separate processes under ``root`` (``launcher.Launcher``'s, the one
    ``swarmtrain up`` uses); ``nodes`` > 1 is a NATS cluster."""

    root: Path
    peers: int = 2
    nodes: int = 1
    peer_timeout_s: float = PEER_TIMEOUT_S
    proxies: dict[str, TcpProxy] = field(default_factory=dict)
    nats_ports: list[int] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    """More ``SWARMTRAIN_*`` settings for every process of this stack (a shorter round deadline, say)."""
    launcher: Launcher = field(init=False)

    def __post_init__(self) -> None:
        self.launcher = Launcher(self.root, cwd=ROOT)

    @property
    def procs(self) -> dict[str, Process]:
        return self.launcher.procs

    @property
    def env(self) -> dict[str, str]:
        return self.launcher.env

    # ------------------------------------------------------------------ start

    def start(self) -> FaultStack:
        config = servers.write_durable_nats_config(self.root / "nats.conf")
        self.nats_ports = [servers.free_port() for _ in range(self.nodes)]
        if self.nodes == 1:
            self.launcher.nats(self.nats_ports[0], name="nats", config=config).start()
        else:
            self.launcher.nats_cluster(self.nats_ports, config)
        self.pg_port = servers.free_port()
        self.launcher.postgres(self.pg_port).start()
        self.gateway_port = servers.free_port()
        self.launcher.env = {
            **os.environ,
            "SWARMTRAIN_NATS_URL": self.nats_url,
            "SWARMTRAIN_DATABASE_URL": servers.postgres_url(self.pg_port),
            "SWARMTRAIN_BLOB_URL": (self.root / "blobs").as_uri(),
            "SWARMTRAIN_JWT_SECRET": "fault-suite-secret-0123456789abcdef0123456789",
            "SWARMTRAIN_PORT": str(self.gateway_port),
            "SWARMTRAIN_PRESENCE_INTERVAL_S": str(PRESENCE_INTERVAL_S),
            "SWARMTRAIN_PEER_TIMEOUT_S": str(self.peer_timeout_s),
            "SWARMTRAIN_STATE_DIR": str(self.root / "state"),
            "SWARMTRAIN_TORCH_THREADS": "1",
            "SWARMTRAIN_LOG_FORMAT": "json",
            "SWARMTRAIN_LOG_LEVEL": "info",
            "SWARMTRAIN_STREAM_REPLICAS": str(3 if self.nodes >= 3 else 1),
            "SWARMTRAIN_ARGON2_TIME_COST": "1",
            "SWARMTRAIN_ARGON2_MEMORY_KIB": "8192",
            # peers hold no storage key: the scheduler signs the URLs they use, the gateway honours them
            "SWARMTRAIN_BLOB_SIGNING_SECRET": f"fault-suite-blob-{uuid.uuid4().hex}",
            "SWARMTRAIN_BLOB_PUBLIC_URL": f"http://127.0.0.1:{self.gateway_port}",
            # longer than a restart of the gateway here (1-5 s), shorter than the 30 s default: a
            # gateway that is not restarted fails its sessions sooner
            "SWARMTRAIN_TRANSFER_RETRY_S": "15",
            **self.settings,
        }
        # the tap outlives the services (stopped after them, with the servers)
        tap = [sys.executable, "-m", "tests.faults.tap", self.nats_url, str(self.tap_file)]
        self.launcher.command("tap", tap, server=True).start()
        wait_for(Path(f"{self.tap_file}.ready").exists, 30, "the tap to subscribe")
        for name in ("projector", "scheduler", "gateway"):
            self.launcher.service(name).start()
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        wait_for(self.ready, 90, "the gateway to be ready")
        for i in range(1, self.peers + 1):
            self.add_peer(f"peer-{i}")
        return self

    @property
    def nats_url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.nats_ports)

    @property
    def tap_file(self) -> Path:
        return self.root / "tap.jsonl"

    def log(self, name: str) -> Path:
        return self.launcher.log(name)

    def cli(self, *args: str) -> list[str]:
        return [*SWARMTRAIN, *args]

    def service(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        """``argv`` as the process ``name`` (not started), with the stack's environment unless ``env``."""
        return self.launcher.command(name, argv, env)

    def add_peer(self, name: str, *, proxied: bool = False) -> Process:
        """Start a peer; ``proxied``: it reaches NATS only through a TcpProxy the test can cut."""
        url = self.nats_url
        if proxied:
            proxy = self.proxies[name] = TcpProxy(self.nats_ports[0])
            url = f"nats://127.0.0.1:{proxy.port}"
        return self.launcher.peer(name, url).start()

    # ------------------------------------------------------------------ look

    def ready(self) -> dict[str, Any] | None:
        gateway = self.procs["gateway"]
        assert gateway.alive() or gateway.paused, f"the gateway exited:\n{self.tail('gateway')}"
        try:
            resp = httpx.get(self.url + "/readyz", timeout=2)
        except httpx.HTTPError:
            return None
        body: dict[str, Any] = resp.json()
        return body if resp.status_code == 200 else None

    def caught_up(self) -> dict[str, Any] | None:
        """Ready, and the read models have every stored event."""
        body = self.ready()
        return body if body and body["projection_lag"] == 0 else None

    def tail(self, name: str, chars: int = 3000) -> str:
        return self.launcher.tail(name, chars)

    def logs(self) -> str:
        return self.launcher.all_logs()

    # ------------------------------------------------------------------ stop

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        self.launcher.close(timeout=15)


class Api:
    """A REST client that signs up once and remembers what the gateway acknowledged (201s)."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)
        self.acked_sessions: list[str] = []
        self.acked_datasets: list[str] = []
        email, password = f"u{uuid.uuid4().hex[:10]}@example.org", "correct horse battery staple"
        resp = self.client.post("/auth/signup", json={"email": email, "password": password})
        assert resp.status_code == 201, resp.text
        self.user_id: str = resp.json()["user_id"]
        resp = self.client.post("/auth/signin", json={"email": email, "password": password})
        assert resp.status_code == 200, resp.text
        self.client.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def upload(self, path: Path = DIGITS) -> str:
        with path.open("rb") as f:
            resp = self.client.post("/datasets", files={"file": (path.name, f, "text/csv")})
        assert resp.status_code == 201, resp.text
        dataset_id: str = resp.json()["dataset_id"]
        self.acked_datasets.append(dataset_id)
        return dataset_id

    def peers(self) -> list[dict[str, Any]]:
        resp = self.client.get("/peers")
        assert resp.status_code == 200, resp.text
        body: list[dict[str, Any]] = resp.json()
        return body

    def idle(self, names: list[str], timeout: float = 90) -> dict[str, str]:
        """Wait until the named peers are online and idle; their ids by name."""

        def check() -> dict[str, str] | None:
            online = {p["name"]: p["peer_id"] for p in self.peers() if p["status"] == "online"}
            return {n: online[n] for n in names} if all(n in online for n in names) else None

        return wait_for(check, timeout, f"peers {names} idle")

    def sweep(self, dataset_id: str, hps: list[dict[str, Any]]) -> str:
        return self.request_session(session_body(dataset_id, len(hps), hps, strategy="sweep", **SHAPE))

    def fedavg(self, dataset_id: str, num_peers: int, rounds: int, hp: dict[str, Any], **options: Any) -> str:
        """A fedavg session: ``rounds`` rounds of ``hp`` on each of ``num_peers`` shards."""
        fields = {"strategy": "fedavg", "rounds": rounds, **SHAPE, **options}
        return self.request_session(session_body(dataset_id, num_peers, hp, **fields))

    def request_session(self, body: dict[str, Any]) -> str:
        resp = self.client.post("/sessions", json=body)
        assert resp.status_code == 201, resp.text
        sid: str = resp.json()["session_id"]
        self.acked_sessions.append(sid)
        return sid

    def session(self, sid: str) -> dict[str, Any]:
        resp = self.client.get(f"/sessions/{sid}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def metrics(self, sid: str) -> dict[str, Any]:
        resp = self.client.get(f"/sessions/{sid}/metrics")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def started(self, sid: str, epoch: int = 1, timeout: float = 60) -> dict[str, Any]:
        """Wait until every peer of the session has reported ``epoch``: the moment to strike."""
        return wait_for(
            lambda: (s := self.session(sid))["peers"] and all(p["epoch"] >= epoch for p in s["peers"]) and s,
            timeout,
            f"session {sid} at epoch {epoch}",
        )

    def ended(self, sid: str, timeout: float = SESSION_BOUND_S) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.session(sid))["status"] in SESSION_TERMINAL and s, timeout, f"session {sid} to end"
        )


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...``: t["s"] is the seconds the block took (recorded, never asserted)."""
    out: dict[str, float] = {}
    start = time.monotonic()
    try:
        yield out
    finally:
        out["s"] = round(time.monotonic() - start, 1)
