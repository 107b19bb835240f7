"""fedavg's round options in a session request, as plain function calls: decoded with their bounds,
refused with ``fedopts.check_options``' reason, refused for a strategy without rounds, and stored
with the outer optimizer's learning rate resolved."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from litestar.exceptions import ClientException

from swarmtrain.common.events import SessionRequested
from swarmtrain.common.fedopts import OUTER_DEFAULT_LR, AggregatorSpec, OuterSpec, ShardingSpec
from swarmtrain.common.settings import Settings
from swarmtrain.gateway.sessions.planning import parse_session, plan_session
from swarmtrain.gateway.sessions.schemas import SessionIn
from tests.factories import session_requested

SETTINGS = Settings(jwt_secret="x" * 32)
HP = {"epochs": 2, "batch_size": 32, "lr": 0.01}


def request(num_peers: int = 4, strategy: str = "fedavg", **options: Any) -> SessionIn:
    body = {"dataset_id": "d", "num_peers": num_peers, "hyperparameters": HP, "strategy": strategy, **options}
    return msgspec.json.decode(msgspec.json.encode(body), type=SessionIn)


def test_every_option_reaches_the_plan_and_the_outer_learning_rate_is_resolved() -> None:
    plan = plan_session(
        request(
            5,
            aggregator={"name": "krum", "f": 1},
            outer={"name": "nesterov"},
            compression={"name": "int8"},
            sharding={"name": "label_skew", "alpha": 0.1},
            keep_local_optimizer=True,
        ),
        SETTINGS,
    )
    options = plan.round_options
    assert options.aggregator == AggregatorSpec(name="krum", f=1)
    assert options.outer == OuterSpec(name="nesterov", lr=OUTER_DEFAULT_LR["nesterov"])
    assert (options.compression.name, options.sharding, options.keep_local_optimizer) == (
        "int8",
        ShardingSpec(name="label_skew", alpha=0.1),
        True,
    )


def test_no_options_is_todays_fedavg_with_concrete_values() -> None:
    options = plan_session(request(2), SETTINGS).round_options
    assert options.aggregator.name == "mean" and options.outer == OuterSpec(name="none", lr=1.0)
    assert options.compression.name == "none" and options.sharding.name == "iid" and not options.keep_local_optimizer


@pytest.mark.parametrize(
    ("num_peers", "options", "reason"),
    [
        (4, {"aggregator": {"name": "krum", "f": 1}}, "krum with f=1 needs at least 5 participants"),
        (6, {"aggregator": {"name": "multi_krum", "f": 1, "m": 6}}, "multi_krum averages at most"),
        (3, {"aggregator": {"name": "trimmed_mean", "beta": 0.2}}, "trims no update of 3"),
        (1, {"sharding": {"name": "label_skew"}}, "label_skew needs at least 2 peers"),
    ],
)
def test_options_the_peers_could_not_follow_are_refused_with_the_rules_reason(
    num_peers: int, options: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ClientException, match=reason):
        plan_session(request(num_peers, **options), SETTINGS)


@pytest.mark.parametrize(
    "options",
    [
        {"aggregator": {"name": "median"}},
        {"compression": {"name": "fp16"}},
        {"keep_local_optimizer": False},
        {"max_update_norm": 10.0},
    ],
)
def test_a_sweep_takes_no_round_option(options: dict[str, Any]) -> None:
    name = next(iter(options))
    with pytest.raises(ClientException, match=f"{name} applies to fedavg only"):
        plan_session(request(2, "sweep", **options), SETTINGS)
    with pytest.raises(ClientException, match=f"{name} applies to fedavg only"):
        plan_session(request(2, "sweep", round_options=options), SETTINGS)


def test_the_round_options_may_come_as_one_object_or_flat_but_each_once() -> None:
    flat = {"aggregator": {"name": "median"}, "max_update_norm": 5.0, "keep_local_optimizer": True}
    nested = plan_session(request(3, round_options=flat), SETTINGS).round_options
    assert nested == plan_session(request(3, **flat), SETTINGS).round_options
    assert (nested.aggregator.name, nested.max_update_norm, nested.keep_local_optimizer) == ("median", 5.0, True)
    mixed = plan_session(request(3, aggregator={"name": "median"}, round_options={"max_update_norm": 5.0}), SETTINGS)
    assert mixed.round_options.aggregator.name == "median" and mixed.round_options.max_update_norm == 5.0
    with pytest.raises(ClientException, match="aggregator is given twice"):
        plan_session(
            request(3, aggregator={"name": "median"}, round_options={"aggregator": {"name": "mean"}}), SETTINGS
        )
    with pytest.raises(ClientException, match="round_options"):
        parse_session({"dataset_id": "d", "num_peers": 3, "hyperparameters": HP, "round_options": {"lr": 1}})


@pytest.mark.parametrize(
    "options",
    [
        {"aggregator": {"name": "geometric_median"}},
        {"aggregator": {"name": "trimmed_mean", "beta": 0.5}},
        {"outer": {"name": "adam", "lr": 0}},
        {"sharding": {"name": "label_skew", "alpha": 0}},
        {"compression": {"name": "int4"}},
        {"outer": {"name": "momentum", "momentum": 0.9}},
    ],
)
def test_values_out_of_the_contracts_bounds_do_not_decode(options: dict[str, Any]) -> None:
    with pytest.raises(ClientException):
        parse_session({"dataset_id": "d", "num_peers": 4, "hyperparameters": HP, "strategy": "fedavg", **options})


def test_a_new_fedavg_session_reads_shards_and_an_old_logs_request_reads_the_whole() -> None:
    """New fedavg sessions are planned ``data_read="shard"`` (a sweep reads the whole dataset); a
    ``SessionRequested`` logged before the field decodes as ``whole``, the rule its peers used."""
    assert plan_session(request(2), SETTINGS).data_read == "shard"
    assert plan_session(request(2, strategy="sweep"), SETTINGS).data_read == "whole"
    stored = msgspec.to_builtins(session_requested(dataset_sha256="0" * 64))
    stored.pop("data_read")
    assert msgspec.convert(stored, SessionRequested).data_read == "whole"
