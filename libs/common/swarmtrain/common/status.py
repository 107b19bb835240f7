"""One status vocabulary per thing, used by the scheduler, projector, gateway and CLI alike."""

from __future__ import annotations

from typing import Final, Literal

SessionStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
"""A session: ``queued`` until its peers are locked and it starts, then ``running``, then one of the
three terminal states."""

RunStatus = Literal["training", "done", "failed", "stopped"]
"""One peer's part in a session: ``stopped`` is a run still training when its session ended."""

PeerStatus = Literal["online", "training", "offline"]
"""A peer as the API shows it: ``training`` while a session holds its lock."""

SESSION_TERMINAL: Final[frozenset[SessionStatus]] = frozenset({"completed", "failed", "cancelled"})
SESSION_ACTIVE: Final[frozenset[SessionStatus]] = frozenset({"queued", "running"})
RUN_ENDED: Final[frozenset[RunStatus]] = frozenset({"done", "failed", "stopped"})
