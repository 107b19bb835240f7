"""The training strategies, one module each: the scheduler's rules for it (see ``base.Strategy``).

Each module adds its strategy to ``base.STRATEGIES`` under its contract name; this package imports
every module by name, so that importing it registers them all. Adding a strategy is adding its
module here (and its facts to ``common.strategies``), plus its test.
"""

from __future__ import annotations

from typing import get_args

from swarmtrain.common.events import Strategy as StrategyName
from swarmtrain.scheduler.strategies import fedavg, sweep
from swarmtrain.scheduler.strategies.base import STRATEGIES, Assignment, Strategy

STRATEGIES.check_names(get_args(StrategyName))
MODULES = (sweep, fedavg)


def strategy_of(name: str) -> Strategy:
    return STRATEGIES.get(name)


__all__ = ["MODULES", "STRATEGIES", "Assignment", "Strategy", "strategy_of"]
