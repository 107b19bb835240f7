"""Prometheus metrics, defined once for every service (``prometheus-client``, the text format every
operator's stack scrapes).

The services call the one-line hooks here (``appended``, ``applied``, ``deciding``, ``expose``);
the gateway additionally fills the read-model gauges at scrape time (``swarmtrain.gateway.prometheus``).
Each process has its own registry content: the gateway serves it on ``GET /metrics/prometheus``,
the projector, scheduler and peers on ``SWARMTRAIN_METRICS_PORT`` when that is set (default off).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from swarmtrain.common.logging import get_logger

log = get_logger("swarmtrain.metrics")

EVENTS_APPENDED = Counter(
    "swarmtrain_events_appended", "Events this process appended to the event log, by type", ["type"]
)
EVENTS_APPLIED = Counter(
    "swarmtrain_events_applied", "Events the projector committed to the read models, by type", ["type"]
)
PROJECTION_LAG = Gauge(
    "swarmtrain_projection_lag_events", "Events in the log not yet in the read models (stream last - position)"
)
DEAD_LETTERS = Gauge("swarmtrain_dead_letters", "Events parked in the dead-letter table instead of applied")
SESSIONS = Gauge("swarmtrain_sessions", "Sessions in the read models, by status", ["status"])
PEERS_ONLINE = Gauge("swarmtrain_peers_online", "Peers online, by device", ["device"])
ROUND_SECONDS = Histogram(
    "swarmtrain_round_duration_seconds",
    "fedavg: time from a round's start (session start or the previous round's close) to its close",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
DECISION_SECONDS = Histogram(
    "swarmtrain_scheduler_decision_seconds",
    "Time the scheduler spends in one decide() call",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

PARSE_CACHE = Counter(
    "swarmtrain_peer_parse_cache",
    "Peers: a session's dataset found parsed in memory (hit: the CSV parse skipped) or parsed (miss)",
    ["result"],
)

_ROUND_MARKS_MAX = 10_000
_round_marks: OrderedDict[str, float] = OrderedDict()
"""session id -> when its current round began (epoch seconds), in the process that appends rounds."""


def appended(event: Any) -> None:
    """Hook for every append: counts it, and times fedavg rounds from the events that bound them."""
    name = type(event).__name__
    EVENTS_APPENDED.labels(name).inc()
    session_id = getattr(event, "session_id", None)
    if session_id is None:
        return
    at = event.occurred_at.timestamp()
    if name == "SessionStarted":
        _mark(session_id, at)
    elif name == "RoundClosed":
        began = _round_marks.get(session_id)
        if began is not None:
            ROUND_SECONDS.observe(max(0.0, at - began))
        _mark(session_id, at)
    elif name in ("SessionCompleted", "SessionFailed", "SessionCancelled"):
        _round_marks.pop(session_id, None)


def _mark(session_id: str, at: float) -> None:
    _round_marks[session_id] = at
    _round_marks.move_to_end(session_id)
    while len(_round_marks) > _ROUND_MARKS_MAX:
        _round_marks.popitem(last=False)


def applied(items: list[tuple[Any, Any]]) -> None:
    """Hook for the projector after a batch commits: ``items`` are its (message, event) pairs; the last
    message's ``num_pending`` is how far the read models trail the log."""
    for kind, n in collections.Counter(type(event).__name__ for _, event in items).items():
        EVENTS_APPLIED.labels(kind).inc(n)
    if items:
        with contextlib.suppress(AttributeError, ValueError, TypeError):
            PROJECTION_LAG.set(items[-1][0].metadata.num_pending or 0)


def parse_cache(hit: bool) -> None:
    """Hook for a peer's dataset load: whether its parsed tensors came from the cache."""
    PARSE_CACHE.labels("hit" if hit else "miss").inc()


@contextlib.contextmanager
def deciding() -> Iterator[None]:
    """``with metrics.deciding(): actions = decide(...)``: times one scheduler decision."""
    start = time.perf_counter()
    try:
        yield
    finally:
        DECISION_SECONDS.observe(time.perf_counter() - start)


def expose(port: int, host: str = "0.0.0.0") -> None:
    """Serve this process's metrics on ``port`` (0: off). A port already taken (several processes
    sharing one setting) is logged and skipped rather than stopping the service."""
    if port <= 0:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("metrics port unavailable; not exposing metrics", port=port, error=str(exc))
        return
    log.info("metrics exposed", url=f"http://{host}:{port}/metrics")


__all__ = [
    "DEAD_LETTERS",
    "DECISION_SECONDS",
    "EVENTS_APPENDED",
    "EVENTS_APPLIED",
    "PEERS_ONLINE",
    "PROJECTION_LAG",
    "ROUND_SECONDS",
    "SESSIONS",
    "appended",
    "applied",
    "deciding",
    "expose",
]
