"""The transition rules of a session and of a run (one peer's part in a session), stated once.

The scheduler's fold and the projector's SQL both apply them, so they reach the same statuses
whatever order the events come in:

- a session is ``queued`` until ``SessionStarted`` makes it ``running``; the first terminal event
  (``SessionCompleted``, ``SessionFailed``, ``SessionCancelled``) wins, from ``queued`` or
  ``running``, and nothing moves a session out of a terminal status;
- runs exist from the start that made a session ``running`` (or a later ``ShardReassigned`` while
  it is ``running``); a run is ``training`` until its first ``PeerDone`` (``done``) or
  ``PeerFailed`` (``failed``); the session's end turns its still-training runs into ``stopped``;
  nothing moves a run out of an ended status.
"""

from __future__ import annotations

from swarmtrain.common.events import (
    Event,
    PeerDone,
    PeerFailed,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionStarted,
)
from swarmtrain.common.status import SESSION_TERMINAL, RunStatus, SessionStatus

_SESSION_END: dict[type, SessionStatus] = {
    SessionCompleted: "completed",
    SessionFailed: "failed",
    SessionCancelled: "cancelled",
}


def session_after(status: SessionStatus, event: Event) -> SessionStatus:
    """A session's status once ``event`` (one of its own) is applied."""
    if status in SESSION_TERMINAL:
        return status
    if isinstance(event, SessionStarted):
        return "running" if status == "queued" else status
    return _SESSION_END.get(type(event), status)


def run_after(status: RunStatus, event: Event) -> RunStatus:
    """A run's status once ``event`` is applied: the run's own ``PeerDone``/``PeerFailed``, or an
    event that ends its session (apply it only when it does end the session, see ``ends_session``)."""
    if status != "training":
        return status
    match event:
        case PeerDone():
            return "done"
        case PeerFailed():
            return "failed"
        case SessionCompleted() | SessionFailed() | SessionCancelled():
            return "stopped"
    return status


def starts_session(before: SessionStatus, event: Event) -> bool:
    """Whether ``event`` is the start that makes the session ``running``: only that one creates runs."""
    return isinstance(event, SessionStarted) and session_after(before, event) == "running" and before == "queued"


def ends_session(before: SessionStatus, event: Event) -> bool:
    """Whether ``event`` is the session's first terminal event: only that one stops its runs."""
    return before not in SESSION_TERMINAL and session_after(before, event) in SESSION_TERMINAL


def takes_new_runs(status: SessionStatus) -> bool:
    """Whether a ``ShardReassigned`` may add a run: only to a ``running`` session."""
    return status == "running"
