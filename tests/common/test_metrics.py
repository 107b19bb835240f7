"""The operator's metrics: the hooks count what happened, and the shipped Grafana dashboard asks only
for metrics that exist."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

from prometheus_client import REGISTRY

from swarmtrain.common import metrics
from swarmtrain.common.events import Hyperparameters, RoundClosed, SessionCancelled, SessionStarted, new_id

ROOT = Path(__file__).resolve().parents[2]


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_rounds_are_timed_from_the_events_that_bound_them() -> None:
    sid = new_id()
    started = SessionStarted(session_id=sid, assignments={"p": Hyperparameters(epochs=1, batch_size=8, lr=0.1)})
    count, total = _sample("swarmtrain_round_duration_seconds_count"), _sample("swarmtrain_round_duration_seconds_sum")
    appended = _sample("swarmtrain_events_appended_total", type="RoundClosed")
    metrics.appended(started)
    metrics.appended(
        RoundClosed(session_id=sid, round=1, updates=[], occurred_at=started.occurred_at + timedelta(seconds=3))
    )
    metrics.appended(
        RoundClosed(session_id=sid, round=2, updates=[], occurred_at=started.occurred_at + timedelta(seconds=5))
    )
    assert _sample("swarmtrain_round_duration_seconds_count") == count + 2
    assert _sample("swarmtrain_round_duration_seconds_sum") - total == 5.0  # 3 s, then 2 s
    assert _sample("swarmtrain_events_appended_total", type="RoundClosed") == appended + 2
    metrics.appended(SessionCancelled(session_id=sid))
    metrics.appended(RoundClosed(session_id=sid, round=3, updates=[]))  # no start known: not timed
    assert _sample("swarmtrain_round_duration_seconds_count") == count + 2


def test_decisions_are_timed() -> None:
    before = _sample("swarmtrain_scheduler_decision_seconds_count")
    with metrics.deciding():
        pass
    assert _sample("swarmtrain_scheduler_decision_seconds_count") == before + 1


def test_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(swarmtrain_[a-z_]+)", e)}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    exposed = {m.name + x for m in REGISTRY.collect() for x in suffixes.get(m.type, [""])}
    assert used and used <= exposed, sorted(used - exposed)
    defined = {metric.name for metric in REGISTRY.collect() if metric.name.startswith("swarmtrain_")}
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    assert defined <= shown, f"metrics without a panel: {sorted(defined - shown)}"
