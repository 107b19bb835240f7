"""What every benchmark shares: real servers and services as child processes, statistics, results.

Nothing here is mocked: nats-server and PostgreSQL are the real binaries (as in the test fixtures),
and the services run as ``python -m swarmtrain.cli.main <service>`` processes, as ``swarmtrain up``
starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from swarmtrain.cli.launcher import Launcher, Process
from swarmtrain.common import servers
from swarmtrain.common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / ".swarmtrain" / "bench"
JWT_SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
BLOB_SIGNING_SECRET = "bench-blob-signing-0123456789abcdef0123456789abcdef"

# Nothing is read from the user's environment: a benchmark configures every process it starts
# itself (``Stack.env``, ``settings``), so ``SWARMTRAIN_*`` set in the shell cannot point it at
# another server, store or state folder.
for _name in [k for k in os.environ if k.startswith("SWARMTRAIN_")]:
    del os.environ[_name]


def quick(argv: list[str] | None = None) -> bool:
    """``--quick`` on the command line: small sizes and few iterations, a check that the benchmark
    runs (CI's ``tests/bench``), not a measurement."""
    return "--quick" in (sys.argv[1:] if argv is None else argv)


def settings(scratch: Path, **overrides: Any) -> Settings:
    """In-process settings for a benchmark: defaults, the state folder in ``scratch``, ``overrides``;
    never the environment's."""
    state = scratch / "state"
    fields: dict[str, Any] = {"state_dir": str(state), "blob_url": (state / "blobs").as_uri()} | overrides
    return Settings(**fields)


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


# ------------------------------------------------------------------ results


@dataclass
class Row:
    """One figure: ``value`` measured side by side with ``reference`` (same run, interleaved)."""

    bench: str
    metric: str
    value: float
    unit: str
    reference: float | None = None
    reference_name: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference is None or self.reference == 0:
            return None
        return self.value / self.reference


@dataclass
class Report:
    bench: str
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, value: float, unit: str, **kw: Any) -> Row:
        row = Row(self.bench, metric, value, unit, **kw)
        self.rows.append(row)
        return row

    def write(self, path: Path | None) -> None:
        text = json.dumps(
            {
                "bench": self.bench,
                "rows": [asdict(r) | {"ratio": r.ratio} for r in self.rows],
                "extra": self.extra,
            },
            indent=1,
            default=str,
        )
        if path is None:
            print(text)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def show(report: Report) -> None:
    """A standalone benchmark's end: its table and extras printed, its JSON written to ``--out``."""
    print(table(report.rows))
    for key, value in report.extra.items():
        print(f"  {key}: {value}")
    if (out := cli_output()) is not None:
        report.write(out)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "B/s":
        return f"{value / 1e6:,.0f} MB/s"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def table(rows: Sequence[Row]) -> str:
    head = ("bench", "metric", "value", "reference", "ratio", "target", "met")
    body = []
    for r in rows:
        ref = f"{fmt(r.reference, r.unit)} ({r.reference_name})" if r.reference is not None else "-"
        met = {True: "yes", False: "NO", None: ""}[r.met]
        body.append((r.bench, r.metric, fmt(r.value, r.unit), ref, fmt(r.ratio), r.target, met))
    widths = [max(len(str(x[i])) for x in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cli_output(argv: list[str] | None = None) -> Path | None:
    """``--out FILE`` from the command line, where a benchmark writes its JSON report."""
    argv = sys.argv[1:] if argv is None else argv
    if "--out" in argv:
        return Path(argv[argv.index("--out") + 1])
    return None


# ------------------------------------------------------------------ processes


def rss_mib(pid: int, children: bool = False) -> float:
    """Resident memory of ``pid`` (and its children) in MiB; 0 if it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *(proc.children(recursive=True) if children else [])]
        return float(sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20)
    except psutil.Error:
        return 0.0


def cpu_s(pid: int, children: bool = False) -> float:
    """CPU seconds of ``pid``; with ``children``, also of its live children and of those it reaped
    (PostgreSQL's backends come and go with their connections)."""
    try:
        proc = psutil.Process(pid)
        times = proc.cpu_times()
        total = times.user + times.system
        if children:
            total += times.children_user + times.children_system
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += sum(child.cpu_times()[:2])
        return float(total)
    except psutil.Error:
        return 0.0


class Stack:
    """nats-server, PostgreSQL and the chosen services as child processes in a scratch folder, started
    by ``launcher.Launcher`` (the one ``swarmtrain up`` uses), each with its log in ``logs/<name>.log``."""

    def __init__(self, name: str, *, postgres: bool = True, log_level: str = "info") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"swarmtrain-bench-{name}-"))
        self.launcher = Launcher(self.dir)
        self.logs = self.launcher.logs
        self.nats_port = servers.free_port()
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.nats = self.launcher.nats(self.nats_port, name="nats").start()
        self.pg: Process | None = None
        self.database_url = ""
        if postgres:
            pg_port = servers.free_port()
            self.pg = self.launcher.postgres(pg_port, durable=True).start()
            self.database_url = servers.postgres_url(pg_port)
        self.blob_dir = self.dir / "blobs"
        self.blob_dir.mkdir()
        self.gateway_port = servers.free_port()
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        self.services: dict[str, Process] = {}
        self.launcher.env = self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SWARMTRAIN_")},
            "SWARMTRAIN_NATS_URL": self.nats_url,
            "SWARMTRAIN_DATABASE_URL": self.database_url,
            "SWARMTRAIN_BLOB_URL": self.blob_dir.as_uri(),
            "SWARMTRAIN_STATE_DIR": str(self.dir / "state"),
            "SWARMTRAIN_JWT_SECRET": JWT_SECRET,
            "SWARMTRAIN_PORT": str(self.gateway_port),
            "SWARMTRAIN_LOG_FORMAT": "json",
            "SWARMTRAIN_LOG_LEVEL": log_level,
            "SWARMTRAIN_TORCH_THREADS": "1",
            # peers read and write blobs through signed URLs served by the gateway (trust model)
            "SWARMTRAIN_BLOB_SIGNING_SECRET": BLOB_SIGNING_SECRET,
            "SWARMTRAIN_BLOB_PUBLIC_URL": self.gateway_url,
        }

    @property
    def settings_env(self) -> dict[str, str]:
        return {k: v for k, v in self.env.items() if k.startswith("SWARMTRAIN_")}

    def start(self, service: str, *args: str, name: str | None = None, **env: str) -> Process:
        proc = self.services[name or service] = self.launcher.service(service, *args, name=name, env=env).start()
        return proc

    def wait_log(self, name: str, text: str, timeout: float = 60.0) -> None:
        path = self.logs / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            proc = self.services.get(name)
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{name} exited with {proc.proc and proc.proc.returncode}:\n{self.tail(name)}")
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not log {text!r} in {timeout:.0f}s:\n{self.tail(name)}")

    def wait_gateway(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.gateway_url + "/healthz", timeout=1).status_code == 200:
                    return
            proc = self.services.get("gateway")
            if proc is not None and not proc.alive():
                raise RuntimeError(f"gateway exited:\n{self.tail('gateway')}")
            time.sleep(0.2)
        raise RuntimeError(f"gateway not healthy in {timeout:.0f}s:\n{self.tail('gateway')}")

    def tail(self, name: str, n: int = 3000) -> str:
        return self.launcher.tail(name, n)

    def rss(self) -> dict[str, float]:
        out = {name: rss_mib(p.pid) for name, p in self.services.items()}
        out["nats-server"] = rss_mib(self.nats.pid)
        if self.pg is not None:
            out["postgres (all backends)"] = rss_mib(self.pg.pid, children=True)
        return out

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each process has used so far."""
        out = {name: cpu_s(p.pid) for name, p in self.services.items()}
        out["nats-server"] = cpu_s(self.nats.pid)
        if self.pg is not None:
            out["postgres (all backends)"] = cpu_s(self.pg.pid, children=True)
        return out

    def stop_service(self, name: str) -> None:
        proc = self.services.pop(name, None)
        if proc is not None:
            proc.stop(timeout=20)

    def close(self) -> None:
        self.services.clear()
        self.launcher.close()
        if not os.environ.get("BENCH_KEEP"):
            subprocess.run(["rm", "-rf", str(self.dir)], check=False)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def stack(name: str, **kw: Any) -> Iterator[Stack]:
    st = Stack(name, **kw)
    try:
        yield st
    finally:
        st.close()


async def signup(client: httpx.AsyncClient) -> str:
    """A fresh user, signed in on ``client``; returns the user id."""
    email, password = f"bench{time.time_ns()}@example.org", "correct horse battery staple"
    resp = await client.post("/auth/signup", json={"email": email, "password": password})
    resp.raise_for_status()
    user_id: str = resp.json()["user_id"]
    resp = await client.post("/auth/signin", json={"email": email, "password": password})
    resp.raise_for_status()
    client.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"
    return user_id


async def upload_dataset(client: httpx.AsyncClient, path: Path = ROOT / "examples" / "digits.csv") -> str:
    with path.open("rb") as f:
        resp = await client.post("/datasets", files={"file": (path.name, f.read(), "text/csv")})
    resp.raise_for_status()
    dataset_id: str = resp.json()["dataset_id"]
    return dataset_id


async def wait_idle_peers(database_url: str, n: int, timeout: float = 60.0) -> None:
    """Until the read models show ``n`` idle online peers (what ``POST /sessions`` checks)."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(asyncpg.UndefinedTableError):
                sql = "SELECT count(*) FROM peers WHERE online AND session_id IS NULL"
                if int(await conn.fetchval(sql)) >= n:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {n} idle peers after {timeout:.0f}s")
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
