"""The peer's strategy registry states the contract's strategies, each a module with its ``run``."""

from __future__ import annotations

import inspect
from typing import get_args

import pytest

from swarmtrain.common import events
from swarmtrain.common.registry import Registry, UnknownName
from swarmtrain.peer.strategies import MODULES, STRATEGIES


def test_every_strategy_of_the_contract_has_a_peer_module_and_no_other() -> None:
    assert set(STRATEGIES.list()) == set(get_args(events.Strategy))


def test_a_strategy_is_named_by_its_module_and_runs_as_a_coroutine() -> None:
    for module in MODULES:
        name = module.__name__.rpartition(".")[2]
        assert STRATEGIES.get(name) is module.run
        assert inspect.iscoroutinefunction(module.run)
        assert list(inspect.signature(module.run).parameters) == ["command", "ctx"]


def test_a_registry_refuses_a_name_twice_and_names_its_members_for_an_unknown_one() -> None:
    kinds: Registry[int] = Registry("thing")
    kinds.add("a", 1)

    @kinds.register("b")
    def b() -> None: ...

    assert kinds.list() == ["a", "b"] and "b" in kinds and kinds.get("a") == 1
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        kinds.add("a", 2)
    with pytest.raises(UnknownName, match=r"unknown thing 'c': one of a, b"):
        kinds.get("c")
    with pytest.raises(ImportError, match="differ from"):
        kinds.check_names(["a"])
