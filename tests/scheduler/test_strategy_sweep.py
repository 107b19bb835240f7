"""The sweep strategy's rules as plain calls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import get_args

import msgspec

from swarmtrain.common.events import Hyperparameters, ModelEvaluated, Strategy
from swarmtrain.scheduler.actions import Clocks, Config
from swarmtrain.scheduler.state import Peer, Run, Session
from swarmtrain.scheduler.strategies import STRATEGIES, strategy_of
from tests.factories import session_requested

SWEEP = strategy_of("sweep")
HPS = [Hyperparameters(epochs=e, batch_size=8, lr=0.01) for e in (1, 2, 3)]


def run(status: str = "done", acc: float | None = 0.5, uri: str | None = "file:///m", sha: str = "h") -> Run:
    return Run(hyperparameters=HPS[0], status=status, val_accuracy=acc, model_uri=uri, model_sha256=sha)  # type: ignore[arg-type]


def checked(peer: str, acc: float | None, sha: str = "h") -> ModelEvaluated:
    return ModelEvaluated(session_id="s", peer_id=peer, val_accuracy=acc, model_sha256=sha)


def session(runs: dict[str, Run], evaluations: Mapping[str, float | None] | None = None) -> Session:
    figures = {p: checked(p, acc) for p, acc in (evaluations or {}).items()}
    return Session(request=session_requested("s", len(runs)), status="running", runs=runs, evaluations=figures)


def test_every_strategy_of_the_contract_has_a_module() -> None:
    assert sorted(STRATEGIES.list()) == sorted(get_args(Strategy))
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


def test_the_model_is_the_best_checked_finished_run_and_claims_only_order_the_checks() -> None:
    runs = {
        "a": run(acc=0.7),
        "b": run(acc=0.9),
        "c": run("failed", acc=1.0),  # failed runs never count
        "d": run(acc=0.95, uri=None),  # nor a run without a model
        "e": run(acc=None),  # an unvalidated claim comes last
    }
    assert SWEEP.evaluate(session(runs)) == ["b"]  # the highest claim first
    assert SWEEP.model(session(runs)) is None  # nothing is named before it is checked
    assert SWEEP.evaluate(session(runs, {"b": 0.9})) == []  # no claim left beats 0.9
    assert SWEEP.model(session(runs, {"b": 0.9})) == "b"
    tie = {"a": run(acc=0.9), "b": run(acc=0.9)}
    assert SWEEP.model(session(tie, {"a": 0.9, "b": 0.9})) == "b"  # ties: a stable choice
    assert SWEEP.model(session({"a": run("failed")})) is None


def test_an_inflated_claimed_accuracy_does_not_win() -> None:
    runs = {"liar": run(acc=0.99), "honest": run(acc=0.8)}
    assert SWEEP.evaluate(session(runs)) == ["liar"]
    measured = {"liar": 0.3}
    assert SWEEP.evaluate(session(runs, measured)) == ["honest"]  # its claim beats the liar's checked figure
    measured["honest"] = 0.8
    assert SWEEP.evaluate(session(runs, measured)) == []
    assert SWEEP.model(session(runs, measured)) == "honest"


def test_a_model_that_failed_its_check_or_whose_bytes_differ_never_wins() -> None:
    runs = {"a": run(acc=0.9), "b": run(acc=0.5)}
    failed = session(runs, {"a": None})
    assert SWEEP.evaluate(failed) == ["b"]  # nothing measured yet: the next claim is checked whatever it says
    assert SWEEP.model(session(runs, {"a": None, "b": 0.5})) == "b"
    other_bytes = Session(
        request=session_requested("s", 2),
        runs=runs,
        evaluations={"a": checked("a", 0.99, sha="other"), "b": checked("b", 0.5)},
    )
    assert SWEEP.model(other_bytes) == "b"
    assert SWEEP.model(session(runs, {"a": None, "b": None})) is None
