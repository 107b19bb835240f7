"""Every benchmark of ``make bench`` runs: each in its quick mode (small sizes, few iterations, its
own servers and settings), as its own process, as ``bench.run`` starts it. A benchmark that
crashes, hangs, writes no report or measures nothing fails here; no timing is asserted (the
machines are noisy: the figures are BENCHMARKS.md's business)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import BENCHMARKS, QUICK_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@pytest.mark.timeout(QUICK_TIMEOUT_S + 30)
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_in_quick_mode_and_writes_its_report(name: str, tmp_path: Path) -> None:
    module, _ = BENCHMARKS[name]
    out = tmp_path / f"{name}.json"
    # a user's settings must not reach it: a benchmark configures every process it starts itself
    env = {**os.environ, "SWARMTRAIN_BLOB_URL": "s3://nowhere", "SWARMTRAIN_NATS_URL": "nats://127.0.0.1:1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{module} --quick exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    assert out.exists(), f"{module} wrote no report:\n{proc.stdout[-2000:]}"
    report = json.loads(out.read_text())
    assert report["rows"], f"{module}'s report has no rows"
    for row in report["rows"]:
        assert isinstance(row["value"], int | float) and not math.isnan(row["value"]), f"nothing measured: {row}"
        assert row["unit"] and row["metric"]
