"""The session and run transition rules as plain calls."""

from __future__ import annotations

from typing import get_args

import pytest

from swarmtrain.common.events import (
    Event,
    Heartbeat,
    PeerDone,
    PeerFailed,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionStarted,
)
from swarmtrain.common.lifecycle import ends_session, run_after, session_after, starts_session, takes_new_runs
from swarmtrain.common.status import SESSION_TERMINAL, RunStatus, SessionStatus

STARTED = SessionStarted(session_id="s", assignments={})
COMPLETED = SessionCompleted(session_id="s", best_peer_id="a", best_val_accuracy=None, model_uri="m")
FAILED = SessionFailed(session_id="s", reason="x")
CANCELLED = SessionCancelled(session_id="s")
DONE = PeerDone(
    session_id="s", peer_id="a", model_uri="m", model_sha256="x", epochs=1, loss=0, accuracy=1, train_seconds=1
)
PEER_FAILED = PeerFailed(session_id="s", peer_id="a", reason="x")
BEAT = Heartbeat(session_id="s", peer_id="a", epoch=1, epochs=1, loss=0, accuracy=1, samples_per_s=1)


def test_a_session_starts_once_and_only_from_queued() -> None:
    assert session_after("queued", STARTED) == "running"
    assert starts_session("queued", STARTED)
    for status in ("running", *SESSION_TERMINAL):
        assert not starts_session(status, STARTED)  # type: ignore[arg-type]
        assert session_after(status, STARTED) == status  # type: ignore[arg-type]


@pytest.mark.parametrize(("event", "status"), [(COMPLETED, "completed"), (FAILED, "failed"), (CANCELLED, "cancelled")])
def test_the_first_terminal_event_wins(event: Event, status: SessionStatus) -> None:
    for before in ("queued", "running"):
        assert session_after(before, event) == status  # type: ignore[arg-type]
        assert ends_session(before, event)  # type: ignore[arg-type]
    for before in SESSION_TERMINAL:
        assert session_after(before, event) == before
        assert not ends_session(before, event)


def test_runs_end_once_and_the_session_end_stops_the_still_training() -> None:
    assert [run_after("training", e) for e in (DONE, PEER_FAILED, COMPLETED, FAILED, CANCELLED, BEAT)] == [
        "done",
        "failed",
        "stopped",
        "stopped",
        "stopped",
        "training",
    ]
    for ended in ("done", "failed", "stopped"):
        for event in (DONE, PEER_FAILED, CANCELLED):
            assert run_after(ended, event) == ended  # type: ignore[arg-type]
    assert set(get_args(RunStatus)) == {"training", "done", "failed", "stopped"}


def test_only_a_running_session_takes_new_runs() -> None:
    assert [s for s in get_args(SessionStatus) if takes_new_runs(s)] == ["running"]
