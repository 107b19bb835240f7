"""sweep: every peer trains the whole dataset with its own hyperparameters; the session's model is
the best validated one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from swarmtrain.common.events import SessionRequested
from swarmtrain.scheduler.strategies.base import Assignment, best_validated

if TYPE_CHECKING:
    from swarmtrain.scheduler.actions import Action, Clocks, Config
    from swarmtrain.scheduler.state import Peer, Session


class Sweep:
    name = "sweep"
    rounds = False

    def assign(self, request: SessionRequested, peer_ids: Sequence[str]) -> Assignment:
        """Peer i (in the given order) trains with the request's i-th hyperparameters."""
        return Assignment(dict(zip(peer_ids, request.hyperparameters, strict=True)), {})

    def step(self, session: Session, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
        """Nothing: a failed peer ends only its own run; the session goes on with the others."""
        return []

    def model(self, session: Session) -> str | None:
        return best_validated(session.runs)


STRATEGY = Sweep()
