"""What a session request may ask of each training strategy: one entry per strategy of the contract.

Adding a strategy to ``swarmtrain.common.events.Strategy`` means adding its rules here (a test
checks that every strategy has them); the checks in ``planning`` read them and name no strategy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import get_args

from swarmtrain.common.events import FEDAVG, SWEEP, Strategy


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyRules:
    description: str
    """One line for a person choosing a strategy (the dashboard shows it)."""
    shared_model: bool
    """The peers train one model together: one hyperparameters set for all of them."""
    rounds: bool
    """The session trains in rounds (``rounds`` may exceed 1; epochs are per round)."""
    sharded: bool
    """Each peer trains a shard of the training rows, so none may be empty."""


RULES: dict[Strategy, StrategyRules] = {
    SWEEP: StrategyRules(
        description="each peer trains all the data with its own hyperparameters",
        shared_model=False,
        rounds=False,
        sharded=False,
    ),
    FEDAVG: StrategyRules(
        description="peers train shards and average their weights each round",
        shared_model=True,
        rounds=True,
        sharded=True,
    ),
}
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


def rules(strategy: Strategy) -> StrategyRules:
    return RULES[strategy]


def as_json() -> dict[str, dict[str, object]]:
    """Every strategy's rules by name, in the contract's order: what the dashboard's pages get."""
    return {s: asdict(RULES[s]) for s in STRATEGIES}


def with_rounds() -> list[Strategy]:
    """The strategies that train in rounds, in the contract's order."""
    return [s for s in STRATEGIES if RULES[s].rounds]
