"""The training strategies, one module each: the scheduler's rules for it (see ``base.Strategy``).

A module here that defines ``STRATEGY`` is registered under ``STRATEGY.name``; adding a strategy
is adding its module (and its name to the contract's ``Strategy``), plus its test.
"""

from __future__ import annotations

import importlib
import pkgutil

from swarmtrain.scheduler.strategies.base import Assignment, Strategy


def _discover() -> dict[str, Strategy]:
    found: dict[str, Strategy] = {}
    for module in pkgutil.iter_modules(__path__):
        strategy = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STRATEGY", None)
        if strategy is not None:
            found[strategy.name] = strategy
    return found


STRATEGIES: dict[str, Strategy] = _discover()


def strategy_of(name: str) -> Strategy:
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Assignment", "Strategy", "strategy_of"]
