"""Each training strategy's static facts, stated once in the contract and read by everyone.

The gateway's request checks, the scheduler (does it open rounds?), the peer, the CLI and the
dashboard ask :func:`rules` (``rules(s).rounds``, ``rules(s).shared_model``...) and never compare
a strategy's name. Adding a strategy is its name in ``events.Strategy``, its facts here (a test
checks that every strategy of the contract has them), and one module on each side that runs it:
``scheduler/strategies/<name>.py`` and ``peer/strategies/<name>.py``, each registered in its
side's registry (``common.registry``), which checks its names against these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import get_args

from swarmtrain.common.events import FEDAVG, SWEEP, Strategy
from swarmtrain.common.registry import Registry


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


RULES: Registry[StrategyRules] = Registry("strategy")
"""Every strategy's facts by its contract name, in the contract's order."""

RULES.add(
    SWEEP,
    StrategyRules(
        description="each peer trains all the data with its own hyperparameters",
        shared_model=False,
        rounds=False,
        sharded=False,
    ),
)
RULES.add(
    FEDAVG,
    StrategyRules(
        description="peers train shards and average their weights each round",
        shared_model=True,
        rounds=True,
        sharded=True,
    ),
)
RULES.check_names(get_args(Strategy))
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


def rules(strategy: str) -> StrategyRules:
    """``strategy``'s facts; ``UnknownName`` for a name the contract does not have."""
    return RULES.get(strategy)


def as_json() -> dict[str, dict[str, object]]:
    """Every strategy's rules by name, in the contract's order: what the dashboard's pages get."""
    return {s: asdict(RULES.get(s)) for s in STRATEGIES}


def with_rounds() -> list[Strategy]:
    """The strategies that train in rounds, in the contract's order."""
    return [s for s in STRATEGIES if RULES.get(s).rounds]
