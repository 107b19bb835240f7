"""The benchmarks outside ``make bench`` (quality figures, GPU runs, the placement simulation) run
too, small, as their own processes: each with the arguments that make it a check that it runs,
not a measurement. Every module of ``bench/`` is either one of ``bench.run``'s or listed here, so a
new benchmark cannot be left out of CI unseen. No figure or timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
"""A hang guard on a busy 2-core machine, not a timing."""
pytestmark = pytest.mark.e2e

SCRIPTS: dict[str, list[str]] = {
    "bench.placement": ["--out", "{out}"],
    "bench.gpu": ["--quick", "--out", "{out}"],
    "bench.fedavg_tune": ["--quick"],
    "bench.fedavg_robust": ["--quick", "--sections", "gap", "--datasets", "digits", "--json", "{out}"],
    "bench.round_overhead": ["--rounds", "2", "--json", "{out}"],
    "bench.fedavg_gap": ["--rounds", "1", "--local-epochs", "1", "--seeds", "0"],
}
"""Each script outside ``bench.run`` and the arguments of its small run (``{out}``: a JSON report)."""
HELPERS = {"bench._common", "bench._fakepeers", "bench.run", "bench"}


def test_every_benchmark_module_runs_in_ci() -> None:
    modules = {f"bench.{p.stem}" if p.stem != "__init__" else "bench" for p in (ROOT / "bench").glob("*.py")}
    covered = {module for module, _ in BENCHMARKS.values()} | set(SCRIPTS) | HELPERS
    assert modules - covered == set(), "a benchmark neither bench.run nor tests/bench/test_scripts.py runs"


@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("module", sorted(SCRIPTS))
def test_benchmark_script_runs_small(module: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = [a.replace("{out}", str(out)) for a in SCRIPTS[module]]
    env = {**os.environ, "SWARMTRAIN_BLOB_URL": "s3://nowhere", "SWARMTRAIN_NATS_URL": "nats://127.0.0.1:1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    if "{out}" in SCRIPTS[module]:
        assert out.exists(), f"{module} wrote no report:\n{proc.stdout[-2000:]}"
        assert json.loads(out.read_text()), f"{module}'s report is empty"
    else:
        assert any(ch.isdigit() for ch in proc.stdout), f"{module} printed no figure:\n{proc.stdout[-2000:]}"
