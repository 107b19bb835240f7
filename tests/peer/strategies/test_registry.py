"""The peer's strategy registry states the contract's strategies, each a module with its ``run``."""

from __future__ import annotations

import inspect
from typing import get_args

from swarmtrain.common import events
from swarmtrain.peer.strategies import STRATEGIES, fedavg, sweep


def test_every_strategy_of_the_contract_has_a_peer_module_and_no_other() -> None:
    assert set(STRATEGIES) == set(get_args(events.Strategy))


def test_a_strategy_is_named_by_its_module_and_runs_as_a_coroutine() -> None:
    for module in (sweep, fedavg):
        name = module.__name__.rpartition(".")[2]
        assert STRATEGIES[name] is module.run
        assert inspect.iscoroutinefunction(module.run)
        assert list(inspect.signature(module.run).parameters) == ["command", "ctx"]
