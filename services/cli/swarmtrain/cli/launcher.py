"""The one launcher of the platform's processes on one machine. ``swarmtrain up`` (``stack.py``)
starts the whole stack through it, and so do the end-to-end tests, the fault suite and the
benchmarks.

A ``Launcher`` owns named child processes: nats-server (one, or the nodes of a cluster),
PostgreSQL, the services, peers and any other command. Each has its own log file,
``<root>/logs/<name>.log``, and with ``pid_files`` its pid in ``<root>/run/<name>.pid``. Each is a
``Process`` that can be started, stopped, SIGKILLed, paused (SIGSTOP), resumed and restarted by
name, which is what the fault suite does to it. ``supervise`` restarts whatever has died, within a
restart budget, which is what ``swarmtrain up`` does. ``close`` stops the services together, then
the servers in the reverse of the order they were added.

The knobs:
- where state lives: ``root``, with each server's store under it unless one is given;
- the ports: one for each server, and in ``env`` for the services;
- the environment every service gets: ``env``. Nothing of the caller's is added, so a benchmark
  can leave out the user's ``SWARMTRAIN_*``;
- which services: ``service(kind)`` once for each process wanted, under any name;
- peers: ``peer(name, nats_url)``, whose environment never holds what ``PEER_WITHHELD`` names.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from swarmtrain.common import servers

SWARMTRAIN = (sys.executable, "-m", "swarmtrain.cli.main")
"""The ``swarmtrain`` command of this interpreter: every service and peer runs as one of its processes."""
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


def peer_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without what a peer may not hold."""
    return {k: v for k, v in env.items() if k not in PEER_WITHHELD}


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
class Process:
    """One child process, by name: started, stopped, killed, paused, resumed and restarted."""

    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    log: Path
    stop_signal: int = signal.SIGTERM
    server: bool = False
    """Stopped after every service: the servers, and whatever must outlive the services."""
    pid_file: Path | None = None
    budget: RestartBudget | None = None
    """How often ``Launcher.supervise`` may restart it; None: never."""
    env: dict[str, str] | None = None
    """Its environment, where the launcher made it (None: the launch callable's own)."""
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    paused: bool = False
    """Stopped by SIGSTOP, until ``resume``."""

    def start(self) -> Process:
        self.proc = self.launch()
        self.paused = False
        if self.pid_file is not None:
            self.pid_file.write_text(f"{self.proc.pid}\n")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def alive(self) -> bool:
        """Running (or paused); also reaps it once it has exited, so no zombie holds its lock files."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, and reap it (so a restart finds no zombie holding its lock files)."""
        assert self.proc is not None, f"{self.name} was never started"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.paused = False

    def pause(self) -> None:
        assert self.proc is not None, f"{self.name} was never started"
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None, f"{self.name} was never started"
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self) -> None:
        if self.alive():
            self.kill()
        self.start()

    def stop_group(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> list[str]:
        """For a process started in a session of its own (``new_session``, as a ``swarmtrain up`` a test
        runs): ``sig`` to its whole process group, at most ``timeout`` to end, then SIGKILL for
        whatever of the group is left. Returns the pids that were left (none, for a clean stop)."""
        assert self.proc is not None, f"{self.name} was never started"
        if self.alive():
            os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        found = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True, check=False)
        left = found.stdout.split()
        if left:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return left

    def stop(self, timeout: float = 15.0) -> None:
        """Its stop signal (SIGKILL after ``timeout``); a paused one is resumed first."""
        if not self.alive():
            return
        assert self.proc is not None
        if self.paused:
            self.resume()
        servers.stop(self.proc, self.stop_signal, timeout=timeout)


@dataclass
class Launcher:
    """Named child processes under ``root``, every one with its own log file (see the module)."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    """The environment of every service and peer (a peer's without ``PEER_WITHHELD``)."""
    pid_files: bool = False
    """Keep each process's pid in ``<root>/run/<name>.pid``."""
    budget: Callable[[], RestartBudget] | None = None
    """Each process's restart budget, for ``supervise``; None: ``supervise`` restarts nothing."""
    cwd: Path | None = None
    procs: dict[str, Process] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.pid_files:
            (self.root / "run").mkdir(parents=True, exist_ok=True)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def __getitem__(self, name: str) -> Process:
        return self.procs[name]

    # ------------------------------------------------------------------ what runs

    def add(
        self,
        name: str,
        launch: Callable[[], subprocess.Popen[bytes]],
        *,
        stop_signal: int = signal.SIGTERM,
        server: bool = False,
    ) -> Process:
        """Register ``launch`` under ``name`` (replacing one of that name); ``.start()`` runs it."""
        proc = Process(
            name,
            launch,
            self.log(name),
            stop_signal=stop_signal,
            server=server,
            pid_file=self.root / "run" / f"{name}.pid" if self.pid_files else None,
            budget=self.budget() if self.budget is not None else None,
        )
        self.procs[name] = proc
        return proc

    def command(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        server: bool = False,
        new_session: bool = False,
    ) -> Process:
        """Any command, its output in its log file; ``env``: instead of the launcher's."""
        log, argv, env = self.log(name), list(argv), self.env if env is None else env

        def launch() -> subprocess.Popen[bytes]:
            with log.open("ab") as out:  # the child has its own copy of the descriptor
                return subprocess.Popen(
                    argv,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.cwd,
                    start_new_session=new_session,
                )

        proc = self.add(name, launch, server=server)
        proc.env = env
        return proc

    def service(self, kind: str, *args: str, name: str | None = None, env: dict[str, str] | None = None) -> Process:
        """``swarmtrain <kind> <args>`` (``gateway``, ``scheduler``, ``projector``, ``peer``, ``up`` …)
        with the launcher's environment and ``env`` on top of it (a peer's without ``PEER_WITHHELD``)."""
        full = {**self.env, **(env or {})}
        return self.command(name or kind, [*SWARMTRAIN, kind, *args], peer_env(full) if kind == "peer" else full)

    def peer(self, name: str, nats_url: str, *args: str, env: dict[str, str] | None = None) -> Process:
        """``swarmtrain peer --nats <nats_url> --name <name> <args>``."""
        return self.service("peer", "--nats", nats_url, "--name", name, *args, name=name, env=env)

    def nats(
        self,
        port: int,
        *,
        name: str = "nats-server",
        store: Path | None = None,
        config: Path | None = None,
        host: str = "127.0.0.1",
    ) -> Process:
        """nats-server with JetStream on ``host:port``, its store ``store`` (default ``<root>/nats``);
        ``start()`` returns once it takes connections."""
        store = store or self.root / "nats"
        log = self.log(name)
        return self.add(name, lambda: servers.start_nats(port, store, log, config, host=host), server=True)

    def nats_cluster(self, ports: Sequence[int], config: Path | None = None) -> list[Process]:
        """A JetStream cluster on loopback, a node a port (``nats-1`` …, stores ``<root>/nats-<i>``),
        started together (they elect a leader together) and each waited for."""
        route_ports = [servers.free_port() for _ in ports]
        routes = tuple(f"nats://127.0.0.1:{p}" for p in route_ports)
        nodes = []
        for i, (port, route_port) in enumerate(zip(ports, route_ports, strict=True), start=1):
            node = servers.ClusterNode(name=f"nats-{i}", cluster_port=route_port, routes=routes)
            store = self.root / node.name
            store.mkdir(parents=True, exist_ok=True)
            nodes.append((port, self.command(node.name, servers.nats_command(port, store, config, node), server=True)))
        for _, proc in nodes:
            proc.start()
        for port, proc in nodes:
            assert proc.proc is not None
            servers.wait_port(port, proc.proc, proc.name)
        return [proc for _, proc in nodes]

    def postgres(self, port: int, *, name: str = "postgres", data: Path | None = None, durable: bool = True) -> Process:
        """PostgreSQL on ``127.0.0.1:port``, its data ``data`` (default ``<root>/postgres``); stopped by
        SIGINT (its fast shutdown); ``start()`` returns once the ``swarmtrain`` database exists."""
        data = data or self.root / "postgres"
        log = self.log(name)
        return self.add(
            name,
            lambda: servers.start_postgres(data, port, log, durable=durable),
            stop_signal=signal.SIGINT,
            server=True,
        )

    # ------------------------------------------------------------------ looking after them

    def supervise(self, say: Callable[[str], None] = print) -> None:
        """Restart every process that has died, servers first (the services need them), each within
        its budget; a ``RuntimeError`` when one has spent it."""
        for proc in sorted(self.procs.values(), key=lambda p: not p.server):
            if proc.proc is None or proc.budget is None:
                continue
            code = proc.proc.poll()  # also reaps it: a zombie postmaster would block its restart
            if code is None:
                continue
            say(f"swarmtrain: {proc.name} exited with {code}; restarting")
            while True:
                if not proc.budget.spend(time.monotonic()):
                    raise RuntimeError(
                        f"{proc.name} died {proc.budget.limit + 1} times within {proc.budget.window_s:.0f}s"
                        f" (last exit {code}); see {proc.log}"
                    )
                proc.restarts += 1
                try:
                    proc.start()
                    break
                except RuntimeError as exc:  # a server that could not start again: try again, within budget
                    say(f"swarmtrain: {proc.name} did not start: {exc}")

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def all_logs(self, chars: int = 3000) -> str:
        """The end of every log file, each under its name."""
        return "\n".join(f"--- {p.name}\n{self.tail(p.stem, chars)}" for p in sorted(self.logs.glob("*.log")))

    # ------------------------------------------------------------------ stop

    def close(self, timeout: float = 20.0) -> None:
        """The services' stop signal all at once (SIGKILL for those still there after ``timeout``),
        then each server's, the last added first; the pid files go."""
        services = [p for p in self.procs.values() if not p.server and p.alive()]
        for proc in services:
            assert proc.proc is not None
            if proc.paused:
                proc.resume()
            proc.proc.send_signal(proc.stop_signal)
        deadline = time.monotonic() + timeout
        for proc in services:
            assert proc.proc is not None
            try:
                proc.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.proc.kill()
                proc.proc.wait()
        for proc in reversed([p for p in self.procs.values() if p.server]):
            proc.stop()
        for proc in self.procs.values():
            if proc.pid_file is not None:
                proc.pid_file.unlink(missing_ok=True)
