"""sweep: every peer trains the whole dataset with its own hyperparameters; the session's model is
the best one by the scheduler's own evaluation on the validation split (``ModelEvaluated``), never
by a peer's claim: the finished models are evaluated in the order of their claims until no model
left unevaluated claims more than the best figure measured (a lie costs the liar one evaluation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from swarmtrain.common.events import SessionRequested
from swarmtrain.scheduler.strategies.base import STRATEGIES, Assignment, best_checked, to_evaluate

if TYPE_CHECKING:
    from swarmtrain.scheduler.actions import Action, Clocks, Config
    from swarmtrain.scheduler.state import Peer, Session


class Sweep:
    name = "sweep"
    rounds = False

    def assign(self, request: SessionRequested, peer_ids: Sequence[str]) -> Assignment:
        """Peer i (in the given order) trains with the request's i-th hyperparameters; a search
        starts with no run (its trials are handed out one by one, ``scheduler.trials``)."""
        if request.search is not None:
            return Assignment({}, {})
        return Assignment(dict(zip(peer_ids, request.hyperparameters, strict=True)), {})

    def step(self, session: Session, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
        """Nothing: a failed peer ends only its own run; the session goes on with the others."""
        return []

    def evaluate(self, session: Session) -> list[str]:
        return to_evaluate(session)

    def model(self, session: Session) -> str | None:
        return best_checked(session)


STRATEGY = STRATEGIES.add(Sweep.name, Sweep())
