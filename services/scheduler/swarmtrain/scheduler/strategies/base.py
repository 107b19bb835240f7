"""What a training strategy is to the scheduler: its rules, as pure functions of a session.

A strategy says who trains what (``assign``), what the scheduler does while a session runs
(``step``: close rounds, act on a failed participant), and which model is the session's
(``model``). It does no I/O; ``decide`` calls it and the shell publishes what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from swarmtrain.common.events import Hyperparameters, SessionRequested
from swarmtrain.common.registry import Registry

if TYPE_CHECKING:
    from swarmtrain.scheduler.actions import Action, Clocks, Config
    from swarmtrain.scheduler.state import Peer, Run, Session


class Assignment(NamedTuple):
    hyperparameters: dict[str, Hyperparameters]
    """peer_id -> the hyperparameters it trains with."""
    shards: dict[str, int]
    """peer_id -> the shard of the dataset it trains; empty when every peer trains all of it."""


class Strategy(Protocol):
    name: str
    """The ``strategy`` of ``SessionRequested`` this module implements."""
    rounds: bool
    """Whether its sessions train in averaging rounds that the scheduler opens and closes."""

    def assign(self, request: SessionRequested, peer_ids: Sequence[str]) -> Assignment:
        """Who trains what, for a session starting on ``peer_ids`` (sorted, ``num_peers`` of them)."""
        ...

    def step(self, session: Session, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
        """What to do now for a ``running`` session; ``idle`` are the peers free to take over work."""
        ...

    def evaluate(self, session: Session) -> list[str]:
        """Once every run ended: the peers whose models the scheduler must evaluate itself
        (``ModelEvaluated``) before ``model`` can answer; [] when ``model`` can answer now."""
        ...

    def model(self, session: Session) -> str | None:
        """The peer whose model is the session's, once every run ended and ``evaluate`` asks for
        nothing more; None fails the session."""
        ...


STRATEGIES: Registry[Strategy] = Registry("scheduler strategy")
"""The scheduler's side of each strategy, by its contract name: each module adds its own
(``STRATEGIES.add(name, ...)``); the package imports every module by name."""


def best_validated(runs: Mapping[str, Run]) -> str | None:
    """The finished run with the best validation accuracy (ties: the greatest peer id)."""
    done = {p: r for p, r in runs.items() if r.status == "done" and r.model_uri}
    if not done:
        return None
    return max(done, key=lambda p: (done[p].val_accuracy or float("-inf"), p))


def _finished(session: Session) -> dict[str, Run]:
    return {p: r for p, r in session.runs.items() if r.status == "done" and r.model_uri and r.model_sha256}


def _checked(session: Session, peer_id: str, run: Run) -> float | None:
    """The scheduler's own figure of ``peer_id``'s model: None if unevaluated or failed, or if it
    measured other bytes than the run's ``PeerDone`` named."""
    evaluation = session.evaluations.get(peer_id)
    if evaluation is None or evaluation.model_sha256 != run.model_sha256:
        return None
    return evaluation.val_accuracy


def best_checked(session: Session) -> str | None:
    """The finished run whose model the scheduler measured best (ties: the greatest peer id)."""
    scored = {p: acc for p, r in _finished(session).items() if (acc := _checked(session, p, r)) is not None}
    return max(scored, key=lambda p: (scored[p], p)) if scored else None


def to_evaluate(session: Session) -> list[str]:
    """The next model to evaluate: the unevaluated finished run with the highest claim, while that
    claim beats the best figure measured so far (or nothing was measured yet); [] once the best
    checked model cannot be beaten by any claim left."""
    done = _finished(session)
    best = best_checked(session)
    measured = max((session.evaluations[p].val_accuracy or 0.0 for p in [best] if p is not None), default=None)
    waiting = sorted(
        (p for p in done if p not in session.evaluations),
        key=lambda p: (done[p].val_accuracy if done[p].val_accuracy is not None else float("-inf"), p),
        reverse=True,
    )
    if not waiting:
        return []
    claim = done[waiting[0]].val_accuracy
    if measured is None or (claim is not None and claim > measured):
        return [waiting[0]]
    return []
