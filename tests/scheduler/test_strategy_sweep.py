"""The sweep strategy's rules as plain calls."""

from __future__ import annotations

from typing import get_args

import msgspec

from swarmtrain.common.events import Hyperparameters, Strategy
from swarmtrain.scheduler.actions import Clocks, Config
from swarmtrain.scheduler.state import Peer, Run, Session
from swarmtrain.scheduler.strategies import STRATEGIES, strategy_of
from tests.factories import session_requested

SWEEP = strategy_of("sweep")
HPS = [Hyperparameters(epochs=e, batch_size=8, lr=0.01) for e in (1, 2, 3)]


def run(status: str = "done", acc: float | None = 0.5, uri: str | None = "file:///m") -> Run:
    return Run(hyperparameters=HPS[0], status=status, val_accuracy=acc, model_uri=uri)  # type: ignore[arg-type]


def test_every_strategy_of_the_contract_has_a_module() -> None:
    assert sorted(STRATEGIES) == sorted(get_args(Strategy))
    assert all(name == s.name for name, s in STRATEGIES.items())


def test_each_peer_trains_the_whole_dataset_with_its_own_hyperparameters() -> None:
    request = msgspec.structs.replace(session_requested("s", 3), hyperparameters=HPS)
    assignment = SWEEP.assign(request, ["a", "b", "c"])
    assert assignment.hyperparameters == {"a": HPS[0], "b": HPS[1], "c": HPS[2]}
    assert assignment.shards == {}


def test_a_running_sweep_needs_nothing_from_the_scheduler_even_when_a_peer_failed() -> None:
    session = Session(
        request=session_requested("s", 2), status="running", runs={"a": run("failed"), "b": run("training")}
    )
    idle = [Peer(peer_id="spare", online=True)]
    assert SWEEP.step(session, idle, Clocks(now=0.0, wall=0.0), Config(uri=str)) == []


def test_the_model_is_the_best_validated_finished_run() -> None:
    runs = {
        "a": run(acc=0.7),
        "b": run(acc=0.9),
        "c": run("failed", acc=1.0),  # failed runs never count
        "d": run(acc=0.95, uri=None),  # nor a run without a model
        "e": run(acc=None),  # an unvalidated model ranks last
    }
    assert SWEEP.model(Session(request=session_requested("s", 5), runs=runs)) == "b"
    tie = {"a": run(acc=0.9), "b": run(acc=0.9)}
    assert SWEEP.model(Session(request=session_requested("s", 2), runs=tie)) == "b"  # ties: a stable choice
    assert SWEEP.model(Session(request=session_requested("s", 1), runs={"a": run("failed")})) is None
