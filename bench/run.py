"""Run every benchmark (or those named), each in its own process, and print one table.

    python -m bench.run              # all of them: what `make bench` runs
    python -m bench.run p3 p4        # some of them
    python -m bench.run --quick      # each in its quick mode (small sizes, few iterations): does it run?

Each benchmark writes its JSON report to ``.swarmtrain/bench/<name>.json``; this runner adds the
machine and writes ``.swarmtrain/bench/latest.json`` and ``latest.md`` (the table for BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._common import RESULTS, ROOT, Row, table

BENCHMARKS = {
    "p1": ("bench.p1_training", 900),
    "p2": ("bench.p2_latency", 240),
    "p3": ("bench.p3_projector", 600),
    "p4": ("bench.p4_start", 180),
    "p6": ("bench.p6_blob", 180),
    "p7": ("bench.p7_scale", 300),
    "shards": ("bench.shard_memory", 1800),
    "search": ("bench.search", 900),
}
QUICK_TIMEOUT_S = 240
"""A hang guard for one quick run (a busy 2-core machine), not a timing."""


def machine() -> dict[str, str]:
    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": sh("nproc"),
        "memory": sh("free -h | awk '/^Mem:/ {print $2}'"),
        "cpu": sh("lscpu | sed -n 's/^Model name: *//p' | head -1"),
        "python": platform.python_version(),
        "commit": sh(f"git -C {ROOT} rev-parse --short HEAD")
        + (" (dirty)" if sh(f"git -C {ROOT} status --porcelain") else ""),
    }


def main(args: list[str], results: Path = RESULTS) -> int:
    fast = "--quick" in args
    names = [a for a in args if not a.startswith("--")] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    results.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    timings: dict[str, float] = {}
    failed: list[str] = []
    loads: dict[str, float] = {}
    started = time.perf_counter()
    for name in names:
        loads[name] = os.getloadavg()[0]
        module, timeout = BENCHMARKS[name]
        out = results / f"{name}.json"
        out.unlink(missing_ok=True)
        print(f"--- {name} ({module}{', quick' if fast else ''})", flush=True)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", module, "--out", str(out), *(["--quick"] if fast else [])]
        try:
            subprocess.run(cmd, cwd=ROOT, check=True, timeout=QUICK_TIMEOUT_S if fast else timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            print(f"!!! {name} failed: {exc}", flush=True)
            failed.append(name)
            continue
        finally:
            timings[name] = time.perf_counter() - t
        if not out.exists():
            print(f"!!! {name} wrote no report to {out}", flush=True)
            failed.append(name)
            continue
        report = json.loads(out.read_text())
        rows += [Row(**{k: v for k, v in r.items() if k != "ratio"}) for r in report["rows"]]
        print(f"    {timings[name]:.0f} s", flush=True)
    total = time.perf_counter() - started
    info = machine()
    info["load_1min_before_each"] = ", ".join(f"{k} {v:.1f}" for k, v in loads.items())
    text = table(rows)
    header = (
        f"{info['date']} · {info['nproc']} cores ({info['cpu']}) · {info['memory']} RAM · Python {info['python']}"
        f" · commit {info['commit']} · {total:.0f} s in all"
        f"\nload average (1 min) before each: {info['load_1min_before_each']}"
    )
    print(f"\n{header}\n\n{text}")
    if max(loads.values(), default=0) > 1.5:
        print("\nnote: the machine was busy with other work (load average above); absolute figures suffer most")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    (results / "latest.md").write_text(f"{header}\n\n```\n{text}\n```\n")
    (results / "latest.json").write_text(
        json.dumps({"machine": info, "seconds": timings, "total_s": total, "failed": failed}, indent=1)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
