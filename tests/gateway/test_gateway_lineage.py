"""init_from and forks checked against their parent, as plain function calls: no servers."""

from __future__ import annotations

import msgspec
import pytest
from litestar.exceptions import ClientException

from swarmtrain.common.events import Hyperparameters, InitFrom
from swarmtrain.common.fedopts import AggregatorSpec
from swarmtrain.common.models import MlpSpec
from swarmtrain.common.settings import Settings
from swarmtrain.gateway.sessions.lineage import check_excluded, check_lineage, fork_fields
from swarmtrain.gateway.sessions.planning import SessionPlan, parse_session, plan_session
from swarmtrain.gateway.sessions.schemas import ForkIn, HyperparametersIn
from tests.factories import session_requested

SETTINGS = Settings(jwt_secret="x" * 32)
HP = Hyperparameters(epochs=2, batch_size=32, lr=0.01)
PARENT = session_requested(
    "p", 3, HP, strategy="fedavg", rounds=5, model=MlpSpec(hidden=[16]), seed=7, max_update_norm=3.0
)


def test_a_fork_inherits_the_parents_settings_and_takes_what_it_gives() -> None:
    fields = fork_fields(PARENT, ForkIn(round=3, num_peers=2))
    plan = plan_session(parse_session(fields), SETTINGS)
    assert (plan.strategy, plan.num_peers, plan.rounds, plan.seed, plan.round_options.max_update_norm) == (
        "fedavg",
        2,
        2,
        7,
        3.0,
    )
    assert plan.model == PARENT.model and plan.hyperparameters == [HP, HP]
    given = ForkIn(round=5, rounds=4, hyperparameters=HyperparametersIn(epochs=1, batch_size=8, lr=0.1))
    plan = plan_session(parse_session(fork_fields(PARENT, given)), SETTINGS)
    assert plan.rounds == 4 and plan.hyperparameters[0] == Hyperparameters(epochs=1, batch_size=8, lr=0.1)
    assert fork_fields(PARENT, ForkIn(round=5))["rounds"] == 1  # nothing left: at least one round


def test_a_forks_round_options_are_checked_like_a_session_requests() -> None:
    plan = plan_session(parse_session(fork_fields(PARENT, ForkIn(round=1, aggregator={"name": "median"}))), SETTINGS)
    assert plan.round_options.aggregator == AggregatorSpec(name="median")
    assert plan.round_options.max_update_norm == PARENT.round_options.max_update_norm == 3.0  # the parent's
    with pytest.raises(ClientException):
        parse_session(fork_fields(PARENT, ForkIn(round=1, aggregator={"name": "no-such-rule"})))


def plan_from(init: InitFrom, hidden: int = 16) -> SessionPlan:
    fields = {"dataset_id": "d", "num_peers": 1, "hyperparameters": msgspec.to_builtins(HP)}
    plan = plan_session(parse_session({**fields, "model": {"hidden": [hidden]}}), SETTINGS)
    return msgspec.structs.replace(plan, init_from=init)


def test_the_model_and_the_datasets_shape_must_be_the_parents() -> None:
    check_lineage(plan_from(InitFrom(session_id="p", round=5)), PARENT, (64, 10), (64, 10))
    with pytest.raises(ClientException, match="model spec"):
        check_lineage(plan_from(InitFrom(session_id="p"), hidden=8), PARENT, (64, 10), (64, 10))
    with pytest.raises(ClientException, match="would not fit"):
        check_lineage(plan_from(InitFrom(session_id="p")), PARENT, (64, 3), (64, 10))


def test_a_round_must_be_one_of_a_parent_with_rounds() -> None:
    with pytest.raises(ClientException, match=r"rounds 1\.\.5"):
        check_lineage(plan_from(InitFrom(session_id="p", round=6)), PARENT, (4, 2), (4, 2))
    sweep = msgspec.structs.replace(PARENT, strategy="sweep", rounds=1)
    with pytest.raises(ClientException, match="no rounds"):
        check_lineage(plan_from(InitFrom(session_id="p", round=1)), sweep, (4, 2), (4, 2))


def test_only_a_participant_can_be_excluded() -> None:
    check_excluded(["a"], {"a", "b"}, "p")
    with pytest.raises(ClientException, match="zed took no part"):
        check_excluded(["a", "zed"], {"a", "b"}, "p")
