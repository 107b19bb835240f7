"""What a session request may ask of each training strategy: one entry per strategy of the contract.

Adding a strategy to ``swarmtrain.common.events.Strategy`` means adding its rules here (a test
checks that every strategy has them); the checks in ``planning`` read them and name no strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from swarmtrain.common.events import FEDAVG, SWEEP, Strategy


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyRules:
    shared_model: bool
    """The peers train one model together: one hyperparameters set for all of them."""
    rounds: bool
    """The session trains in rounds (``rounds`` may exceed 1; epochs are per round)."""
    sharded: bool
    """Each peer trains a shard of the training rows, so none may be empty."""


RULES: dict[Strategy, StrategyRules] = {
    SWEEP: StrategyRules(shared_model=False, rounds=False, sharded=False),
    FEDAVG: StrategyRules(shared_model=True, rounds=True, sharded=True),
}
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


def rules(strategy: Strategy) -> StrategyRules:
    return RULES[strategy]


def with_rounds() -> list[Strategy]:
    """The strategies that train in rounds, in the contract's order."""
    return [s for s in STRATEGIES if RULES[s].rounds]
