"""What a training strategy is to the scheduler: its rules, as pure functions of a session.

A strategy says who trains what (``assign``), what the scheduler does while a session runs
(``step``: close rounds, act on a failed participant), and which model is the session's
(``model``). It does no I/O; ``decide`` calls it and the shell publishes what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from swarmtrain.common.events import Hyperparameters, SessionRequested

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

    def model(self, session: Session) -> str | None:
        """The peer whose model is the session's, once every run ended; None fails the session."""
        ...


def best_validated(runs: Mapping[str, Run]) -> str | None:
    """The finished run with the best validation accuracy (ties: the greatest peer id)."""
    done = {p: r for p, r in runs.items() if r.status == "done" and r.model_uri}
    if not done:
        return None
    return max(done, key=lambda p: (done[p].val_accuracy or float("-inf"), p))
