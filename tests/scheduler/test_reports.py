"""Reports -> facts as plain calls: ``reports.check`` accepts what agrees with the scheduler's state
and refuses the rest with a reason (issue 10)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from swarmtrain.common import shapes
from swarmtrain.common.events import (
    DatasetUploaded,
    Heartbeat,
    Hyperparameters,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    Report,
    ReportRejected,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionStarted,
    UpdateRejected,
)
from swarmtrain.scheduler.actions import Config
from swarmtrain.scheduler.reports import check
from swarmtrain.scheduler.state import State
from tests.factories import session_requested
from tests.scheduler.helpers import replay

HP = Hyperparameters(epochs=2, batch_size=8, lr=0.01)
CONFIG = Config(uri=lambda key: f"file:///blobs/{key}")
ROWS = 101
SHA = "ab" * 32
ROUNDS = "file:///blobs/sessions/s/rounds"


def fedavg(rows: int | None = ROWS) -> State:
    """A running fedavg session of 3 rounds on peers a (shard 0) and b (shard 1); c is not in it."""
    state = State()
    if rows is not None:
        dataset = DatasetUploaded(
            dataset_id="d", owner_id="u", name="d", uri="file:///blobs/datasets/d.csv", sha256=SHA,
            size_bytes=1, rows=rows, features=4, classes=2, label_column="label",
        )  # fmt: skip
        state = replay(state, dataset)
    request = session_requested("s", 2, HP, strategy="fedavg", rounds=3, validation_split=0.2)
    return replay(
        state,
        *(PeerRegistered(peer_id=p, name=p, device="cpu") for p in "abc"),
        request,
        PeerLocked(peer_id="a", session_id="s"),
        PeerLocked(peer_id="b", session_id="s"),
        SessionStarted(session_id="s", assignments={"a": HP, "b": HP}, shards={"a": 0, "b": 1}),
    )


def shard_rows(shard: int) -> int:
    return shapes.shard_sizes(shapes.training_rows(ROWS, 0.2), 2)[shard]


def update(peer: str = "a", round_: int = 1, **fields: Any) -> ModelUpdatePublished:
    values: dict[str, Any] = {
        "event_id": f"s.r{round_}.{peer}.update",
        "session_id": "s",
        "round": round_,
        "peer_id": peer,
        "uri": f"{ROUNDS}/{round_}/{peer}.safetensors",
        "sha256": SHA,
        "num_samples": shard_rows(0 if peer == "a" else 1),
        "loss": 0.5,
        "accuracy": 0.7,
    }
    return ModelUpdatePublished(**{**values, **fields})


def heartbeat(peer: str = "a", **fields: Any) -> Heartbeat:
    values: dict[str, Any] = {
        "event_id": f"s.{peer}.epoch1",
        "session_id": "s",
        "peer_id": peer,
        "epoch": 1,
        "epochs": 6,
        "loss": 0.5,
        "accuracy": 0.6,
        "val_accuracy": 0.6,
        "samples_per_s": 100.0,
    }
    return Heartbeat(**{**values, **fields})


def closed(state: State, round_: int = 1) -> State:
    updates = [
        RoundUpdate(peer_id=p, uri=f"{ROUNDS}/{round_}/{p}.safetensors", sha256=SHA, num_samples=shard_rows(i))
        for i, p in enumerate("ab")
    ]
    state = replay(state, update("a", round_), update("b", round_))
    return replay(state, RoundClosed(event_id=f"s.r{round_}.closed", session_id="s", round=round_, updates=updates))


def reason(state: State, sender: str, report: Report) -> str:
    outcome = check(state, sender, report, CONFIG)
    assert isinstance(outcome, ReportRejected), f"{type(report).__name__} accepted"
    assert outcome.peer_id == sender and outcome.report_id == report.event_id
    assert outcome.report_type == type(report).__name__
    return outcome.reason


def test_an_assigned_peers_true_reports_become_the_same_messages_as_facts() -> None:
    state = fedavg()
    for sent in (heartbeat(), update()):
        assert check(state, "a", sent, CONFIG) is sent  # same event_id: a retried report is deduplicated
    state = closed(state)
    averaged = RoundAveraged(
        event_id="s.r1.averaged", session_id="s", round=1, uri=f"{ROUNDS}/1/average.safetensors", sha256=SHA,
        peer_id="b", val_accuracy=0.7,
    )  # fmt: skip
    rejected = UpdateRejected(
        event_id="s.r1.a.rejected", session_id="s", round=1, peer_id="a", reason="NaN", reported_by="b"
    )
    failed = PeerFailed(event_id="s.b.failed", session_id="s", peer_id="b", reason="diverged: non-finite loss at 3")
    for report in (averaged, rejected, failed):
        assert check(state, "b", report, CONFIG) is report
    registered = PeerRegistered(peer_id="c", name="box", device="cpu")
    assert check(State(), "c", registered, CONFIG) is registered


def test_a_report_in_another_peers_name_is_refused() -> None:
    assert "in the name of 'a'" in reason(fedavg(), "c", heartbeat("a"))
    assert "in the name of" in reason(State(), "c", PeerRegistered(peer_id="victim", name="x", device="cpu"))


def test_a_peer_not_assigned_to_the_session_is_refused() -> None:
    state = fedavg()
    assert "holds no training run" in reason(state, "c", heartbeat("c"))
    assert "holds no training run" in reason(state, "c", update("c"))
    done = replay(state, PeerFailed(session_id="s", peer_id="a", reason="x"))
    assert "holds no training run" in reason(done, "a", heartbeat())  # its run ended
    assert "not running" in reason(
        state, "a", msgspec.structs.replace(heartbeat(), session_id="other", event_id="other.a.e1")
    )


def test_an_update_for_a_round_that_is_not_open_is_refused() -> None:
    state = fedavg()
    assert "round 2 is not open" in reason(state, "a", update(round_=2))
    state = closed(state)
    assert "round 1 is not open" in reason(state, "a", update(round_=1))
    assert check(state, "a", update(round_=2), CONFIG).event_id == "s.r2.a.update"
    twice = replay(state, update(round_=2))
    assert "already published" in reason(twice, "a", update(round_=2, event_id="s.r2.a.update.again"))


@pytest.mark.parametrize(
    "uri",
    [
        f"{ROUNDS}/1/b.safetensors",  # another peer's slot
        f"{ROUNDS}/1/../1/a.safetensors",
        "file:///etc/passwd",
        f"{ROUNDS}/2/a.safetensors",  # another round's
    ],
)
def test_an_update_at_any_uri_but_the_one_handed_is_refused(uri: str) -> None:
    assert "is not the update URI it was handed" in reason(fedavg(), "a", update(uri=uri))


@pytest.mark.parametrize("num_samples", [10**12, 0, -1])
def test_an_inflated_or_wrong_sample_count_is_refused(num_samples: int) -> None:
    why = reason(fedavg(), "a", update(num_samples=num_samples))
    assert f"shard 0 holds {shard_rows(0)} training rows" in why


def test_an_update_of_a_session_whose_dataset_size_is_unknown_is_refused() -> None:
    assert "size is unknown" in reason(fedavg(rows=None), "a", update())


def test_figures_out_of_bounds_are_refused() -> None:
    state = fedavg()
    assert "accuracy" in reason(state, "a", heartbeat(accuracy=1.5))
    assert "loss" in reason(state, "a", heartbeat(loss=float("inf")))
    assert "val_accuracy" in reason(state, "a", heartbeat(val_accuracy=-0.1))
    assert "epoch 7 of 6" in reason(state, "a", heartbeat(epoch=7))
    assert "sha256" in reason(state, "a", update(sha256="not-a-hash"))
    assert "reason" in reason(state, "a", PeerFailed(event_id="s.a.failed", session_id="s", peer_id="a", reason=""))


def test_a_report_may_not_take_an_id_the_services_decide_with() -> None:
    state = fedavg()
    for taken in ("s.completed", "s.failed", "s.b.failed", "s.r1.closed", "s.started.abc", "other.a.epoch1"):
        assert "event_id" in reason(state, "a", heartbeat(event_id=taken))
    own = PeerFailed(event_id="s.a.failed", session_id="s", peer_id="a", reason="diverged")
    assert check(state, "a", own, CONFIG) is own  # its own run's failure: the same fact the scheduler would write
    assert "event_id" in reason(State(), "c", PeerRegistered(event_id="c.online.3", peer_id="c", name="c", device="c"))


def test_done_only_at_the_handed_output_uri_and_for_fedavg_only_after_the_last_round() -> None:
    state = fedavg()
    for r in (1, 2, 3):
        state = closed(state, r)
    done = PeerDone(
        event_id="s.a.done", session_id="s", peer_id="a", model_uri="file:///blobs/sessions/s/models/a.safetensors",
        model_sha256=SHA, epochs=6, loss=0.3, accuracy=0.8, val_accuracy=0.8, train_seconds=3.0,
    )  # fmt: skip
    assert check(state, "a", done, CONFIG) is done
    elsewhere = msgspec.structs.replace(done, model_uri="file:///proc/self/environ")
    assert "not the output_uri" in reason(state, "a", elsewhere)
    assert "is still open" in reason(fedavg(), "a", done)


def test_round_facts_must_name_a_closed_round_and_its_own_objects() -> None:
    state = fedavg()
    averaged = RoundAveraged(
        event_id="s.r1.averaged", session_id="s", round=1, uri=f"{ROUNDS}/1/average.safetensors", sha256=SHA,
        peer_id="a",
    )  # fmt: skip
    assert "round 1 is not closed" in reason(state, "a", averaged)
    state = closed(state)
    moved = msgspec.structs.replace(averaged, uri=f"{ROUNDS}/1/a.safetensors")
    assert "average URI" in reason(state, "a", moved)
    stranger = UpdateRejected(
        event_id="s.r1.c.rejected", session_id="s", round=1, peer_id="c", reason="x", reported_by="a"
    )
    assert "no update of 'c'" in reason(state, "a", stranger)


def test_a_heartbeat_redelivered_after_its_run_finished_is_still_a_fact() -> None:
    """A report fetched by a scheduler that died before it acked comes again after the run's
    ``PeerDone``: an epoch the run trained is still a point of its curve; a later one is not."""
    request = session_requested("w", 2, Hyperparameters(epochs=6, batch_size=8, lr=0.01), validation_split=0.2)
    hp = request.hyperparameters[0]
    state = replay(
        State(),
        request,
        PeerLocked(peer_id="a", session_id="w"),
        PeerLocked(peer_id="b", session_id="w"),
        SessionStarted(session_id="w", assignments={"a": hp, "b": hp}),
        PeerDone(
            event_id="w.a.done", session_id="w", peer_id="a", epochs=6, loss=0.1, accuracy=0.9,
            model_uri="file:///blobs/sessions/w/models/a.safetensors", model_sha256=SHA, train_seconds=1.0,
        ),
    )  # fmt: skip
    late = heartbeat(event_id="w.a.epoch6", session_id="w", epoch=6)
    assert check(state, "a", late, CONFIG) is late
    beyond = heartbeat(event_id="w.a.epoch7", session_id="w", epoch=7, epochs=7)
    assert "holds no training run" in reason(state, "a", beyond)
