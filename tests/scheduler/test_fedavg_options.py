"""fedavg's round options in the scheduler, as plain function calls: every ``Train`` carries them,
``label_skew`` shards are checked against the histograms ``SessionStarted`` holds, and a round's
fact may name only the session's rule (or Krum's fallback) and updates the round named."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from swarmtrain.common.events import (
    DatasetUploaded,
    Event,
    Hyperparameters,
    ModelUpdatePublished,
    PeerLocked,
    PeerRegistered,
    ReportRejected,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionStarted,
)
from swarmtrain.common.fedopts import AggregatorSpec, CompressionSpec, OuterSpec, RoundOptions, ShardingSpec
from swarmtrain.scheduler.actions import Clocks, Config, train_command
from swarmtrain.scheduler.reports import check
from swarmtrain.scheduler.state import State, evolve
from swarmtrain.scheduler.strategies.fedavg import needs_histograms
from tests.factories import session_requested

HP = Hyperparameters(epochs=2, batch_size=8, lr=0.01)
CONFIG = Config(uri=lambda key: f"file:///blobs/{key}")
SHA = "ab" * 32
ROUNDS = "file:///blobs/sessions/s/rounds"
HISTOGRAMS = [[30, 1, 0], [2, 20, 27]]
"""Shard 0 holds 31 rows, shard 1 holds 49: not the equal cut of 80."""
OPTIONS: dict[str, Any] = {
    "aggregator": AggregatorSpec(name="krum", f=0),
    "outer": OuterSpec(name="nesterov", lr=0.7),
    "compression": CompressionSpec(name="int8"),
    "sharding": ShardingSpec(name="label_skew", alpha=0.3),
    "keep_local_optimizer": True,
    "max_update_norm": 50.0,
}


DATASET = DatasetUploaded(
    dataset_id="d", owner_id="u", name="d", uri="file:///blobs/datasets/d.csv", sha256=SHA,
    size_bytes=1, rows=100, features=4, classes=3, label_column="label",
)  # fmt: skip


def started(**options: Any) -> State:
    state = State()
    events: list[Event] = [
        DatasetUploaded(
            dataset_id="d",
            owner_id="u",
            name="d",
            uri="file:///blobs/datasets/d.csv",
            sha256=SHA,
            size_bytes=1,
            rows=100,
            features=4,
            classes=3,
            label_column="label",
        ),
        *(PeerRegistered(peer_id=p, name=p, device="cpu") for p in "ab"),
        session_requested("s", 2, HP, strategy="fedavg", rounds=2, validation_split=0.2, **options),
        PeerLocked(peer_id="a", session_id="s"),
        PeerLocked(peer_id="b", session_id="s"),
        SessionStarted(
            session_id="s",
            assignments={"a": HP, "b": HP},
            shards={"a": 0, "b": 1},
            shard_histograms=HISTOGRAMS if options.get("sharding") else [],
        ),
    ]
    for event in events:
        state = evolve(state, state.position + 1, event, 0.0)
    return state


def update(peer: str, num_samples: int, **fields: Any) -> ModelUpdatePublished:
    return ModelUpdatePublished(
        event_id=f"s.r1.{peer}.update", session_id="s", round=1, peer_id=peer,
        uri=f"{ROUNDS}/1/{peer}.safetensors", sha256=SHA, num_samples=num_samples, loss=0.5, accuracy=0.5,
        **fields,
    )  # fmt: skip


def test_every_train_carries_the_sessions_round_options() -> None:
    request = session_requested("s", 2, HP, strategy="fedavg", rounds=2, **OPTIONS)
    train = train_command(request, "a", HP, 1, 2, Clocks(now=0.0, wall=0.0), CONFIG)
    assert train.round_options == RoundOptions(**OPTIONS) == request.round_options
    assert (train.shard, train.num_shards, train.start_round) == (1, 2, 2)
    assert train.data_read == request.data_read == "whole"  # a request logged before DataRead
    shard_read = session_requested("s", 2, HP, strategy="fedavg", rounds=2, data_read="shard")
    assert train_command(shard_read, "a", HP, 1, 1, Clocks(now=0.0, wall=0.0), CONFIG).data_read == "shard"


def test_only_label_skewed_fedavg_sessions_need_their_shards_counted() -> None:
    assert needs_histograms(session_requested("s", 2, HP, strategy="fedavg", sharding=ShardingSpec(name="label_skew")))
    assert not needs_histograms(session_requested("s", 2, HP, strategy="fedavg"))
    assert not needs_histograms(session_requested("s", 2, HP, sharding=ShardingSpec(name="label_skew")))


def test_a_label_skewed_shards_sample_count_is_checked_against_its_histogram() -> None:
    state = started(**OPTIONS)
    session = state.sessions["s"]
    assert session.shard_rows == (31, 49) and session.training_rows(0) == 31 and session.training_rows(1) == 49
    report = update("a", 31)
    assert check(state, "a", report, CONFIG) is report
    for wrong in (40, 49):  # the iid cut, another shard's
        outcome = check(state, "a", update("a", wrong), CONFIG)
        assert isinstance(outcome, ReportRejected) and "shard 0 holds 31 training rows" in outcome.reason


def test_a_label_skewed_session_started_without_histograms_checks_no_count_as_right() -> None:
    state = started()
    request = session_requested("s", 2, HP, strategy="fedavg", rounds=2, sharding=ShardingSpec(name="label_skew"))
    skewed = dataclasses.replace(state.sessions["s"], request=request)
    assert skewed.training_rows(0) is None and state.sessions["s"].training_rows(0) == 40


def test_an_update_larger_than_the_models_file_could_be_is_refused() -> None:
    state = started(**OPTIONS)
    outcome = check(state, "a", update("a", 31, nbytes=10**12), CONFIG)
    assert isinstance(outcome, ReportRejected) and "nbytes" in outcome.reason


@pytest.mark.parametrize(
    ("aggregator", "selected", "refused"),
    [
        ("krum", ["a"], None),
        ("median", ["a", "b"], None),  # Krum's fallback where too few updates were acceptable
        ("mean", ["a", "b"], "aggregator 'mean' is not one of ['krum', 'median']"),
        ("krum", ["c"], "selected names peers"),
    ],
)
def test_a_rounds_fact_names_the_sessions_rule_and_the_rounds_own_updates(
    aggregator: str, selected: list[str], refused: str | None
) -> None:
    state = started(**OPTIONS)
    for peer, rows in (("a", 31), ("b", 49)):
        state = evolve(state, state.position + 1, update(peer, rows), 0.0)
    named = [
        RoundUpdate(peer_id=p, uri=f"{ROUNDS}/1/{p}.safetensors", sha256=SHA, num_samples=n)
        for p, n in (("a", 31), ("b", 49))
    ]
    state = evolve(
        state, state.position + 1, RoundClosed(event_id="s.r1.closed", session_id="s", round=1, updates=named), 0.0
    )
    averaged = RoundAveraged(
        event_id="s.r1.averaged", session_id="s", round=1, uri=f"{ROUNDS}/1/average.safetensors", sha256=SHA,
        peer_id="a", aggregator=aggregator, selected=selected, update_bytes=1234,
    )  # fmt: skip
    outcome = check(state, "a", averaged, CONFIG)
    if refused is None:
        assert outcome is averaged
    else:
        assert isinstance(outcome, ReportRejected) and refused in outcome.reason
