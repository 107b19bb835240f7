"""Where a session's starting model comes from (``init_from``, a fork), as pure functions of the
scheduler's state.

:func:`starting_model` resolves a queued session's ``init_from`` from the log's facts of its
parent, a session of the SAME owner (never another user's, whatever the request says):

- no ``round``: the parent's final model (its ``SessionCompleted`` model and the sha256 its run's
  ``PeerDone`` recorded); waits while the parent runs; refused if it ended otherwise;
- ``round`` r of a fedavg parent: r's stored average (``RoundAveraged``), bit for bit the model the
  parent's peers held after round r;
- ``round`` r with ``exclude_peers``: r's average recomputed from the updates its ``RoundClosed``
  named, without those peers, by the parent's rule (a ``Recompute`` the shell runs in a worker
  thread, whose result it records as ``InitModelPrepared``); then that.

The model spec must be the parent's (the tensors must fit). :func:`eligible` keeps a fork's
excluded peers out of its placement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from swarmtrain.common import strategies
from swarmtrain.common.events import RoundAveraged, RoundClosed, SessionCompleted, SessionRequested
from swarmtrain.common.status import SESSION_TERMINAL

if TYPE_CHECKING:
    from swarmtrain.scheduler.state import Peer, Session


@dataclass(frozen=True)
class Model:
    """A resolved starting model: an object of the store and its sha256."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class Recompute:
    """Round ``closed.round`` of ``parent`` to average again without ``excluded``; ``start`` is the
    model that round started from (its bound on update norms is measured from it, and it is the
    result when no update is left), None for the parent's seeded initial weights."""

    session_id: str
    parent: SessionRequested
    closed: RoundClosed
    excluded: tuple[str, ...]
    start: Model | None


@dataclass(frozen=True)
class Pending:
    """Not known yet: the parent still runs towards what is asked (or the recomputation runs)."""


@dataclass(frozen=True)
class Refused:
    reason: str


Resolution = Model | Recompute | Pending | Refused | None
"""None: the session asks for no starting model (seeded weights)."""


def starting_model(session: Session, sessions: Mapping[str, Session]) -> Resolution:
    """The starting model of ``session`` (see the module's rules)."""
    req = session.request
    init = req.init_from
    if init is None:
        return None
    parent = sessions.get(init.session_id)
    if parent is None or parent.request.owner_id != req.owner_id:
        return Refused(f"init_from: no session {init.session_id} of this session's owner")
    if parent.session_id == session.session_id:
        return Refused("init_from: a session cannot start from itself")
    if parent.request.model != req.model:
        return Refused(f"init_from: the model spec differs from session {init.session_id}'s")
    running = parent.status not in SESSION_TERMINAL
    if init.round is None:
        if isinstance(parent.ended, SessionCompleted):
            return final_model(parent)
        if running:
            return Pending()
        return Refused(f"init_from: session {init.session_id} ended without a model ({parent.status})")
    r = init.round
    if not strategies.rules(parent.request.strategy).rounds:
        return Refused(f"init_from: session {init.session_id} is a {parent.request.strategy}: it has no rounds")
    if not 1 <= r <= parent.request.rounds:
        return Refused(f"init_from: round {r} is not within session {init.session_id}'s 1..{parent.request.rounds}")
    if init.exclude_peers:
        if session.prepared is not None:
            return Model(session.prepared.uri, session.prepared.sha256)
        closed = parent.closed.get(r)
        start = round_start(parent, r)
        if closed is None or isinstance(start, Pending):
            return Pending() if running else Refused(f"init_from: round {r} of {init.session_id} never closed")
        return Recompute(session.session_id, parent.request, closed, tuple(sorted(init.exclude_peers)), start)
    averaged = stored_average(parent, r)
    if averaged is not None:
        return averaged
    return Pending() if running else Refused(f"init_from: round {r} of {init.session_id} has no stored average")


def final_model(parent: Session) -> Model | Refused:
    """The completed ``parent``'s model, with the sha256 its run's ``PeerDone`` recorded."""
    completed = parent.ended
    assert isinstance(completed, SessionCompleted)
    run = parent.runs.get(completed.best_peer_id)
    if run is None or run.model_sha256 is None or run.model_uri != completed.model_uri:
        return Refused(f"init_from: no fact records the sha256 of session {parent.session_id}'s model")
    return Model(completed.model_uri, run.model_sha256)


def stored_average(parent: Session, round_: int) -> Model | None:
    """Round ``round_``'s average as the parent's peers stored it (``RoundAveraged``)."""
    for fact in parent.facts:
        if isinstance(fact, RoundAveraged) and fact.round == round_:
            return Model(fact.uri, fact.sha256)
    return None


def round_start(parent: Session, round_: int) -> Model | Pending | None:
    """The model round ``round_`` of ``parent`` started from: the previous round's stored average,
    or for round 1 the parent's own starting model (None: its seeded weights)."""
    if round_ > 1:
        return stored_average(parent, round_ - 1) or Pending()
    return Model(*parent.init) if parent.init is not None else None


def excluded(session: Session) -> set[str]:
    """The peers a fork leaves out of its training (none for any other session)."""
    init = session.request.init_from
    return set() if init is None else set(init.exclude_peers)


def eligible(session: Session, peers: Sequence[Peer]) -> list[Peer]:
    """``peers`` without those the session's fork excludes (it trains without them)."""
    init = session.request.init_from
    if init is None or not init.exclude_peers:
        return list(peers)
    excluded = set(init.exclude_peers)
    return [p for p in peers if p.peer_id not in excluded]
