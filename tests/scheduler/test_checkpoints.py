"""Long runs survive (issue 22), as plain calls: a sweep run's ``Train`` carries the signed PUTs of
its checkpoints; a ``CheckpointSaved`` is checked (its run, the handed URI, epochs rising, a bounded
size) before it is a fact; a re-sent ``Train`` names the last checkpoint to resume from."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from swarmtrain.common.events import (
    MAX_CHECKPOINT_URLS,
    CheckpointSaved,
    DatasetUploaded,
    Hyperparameters,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerWentOnline,
    Presence,
    ReportRejected,
    SessionCompleted,
    SessionFailed,
    SessionStarted,
)
from swarmtrain.scheduler.actions import Append, Clocks, Config, Method, Reassign, Send, Timing, train_command
from swarmtrain.scheduler.decide import decide
from swarmtrain.scheduler.reports import check
from swarmtrain.scheduler.state import State, observe_presence
from tests.factories import session_requested
from tests.scheduler import helpers

HP = Hyperparameters(epochs=10, batch_size=8, lr=0.01, checkpoint_every=3)
TIMING = Timing(peer_timeout=5.0, resend_after=10.0, max_resends=3)
WALL = 1_000_000.0
SHA = "cd" * 32
WHEN = datetime.fromtimestamp(WALL, UTC)
CKPT = "file:///blobs/sessions/s/checkpoints/a"


def sign(method: Method, key: str, max_bytes: int | None) -> str:
    return f"https://signed/{method}/{key}" + ("" if max_bytes is None else f"?max={max_bytes}")


CONFIG = Config(uri=lambda key: f"file:///blobs/{key}", timing=TIMING, signer=sign)
replay = functools.partial(helpers.replay, observed_at=WALL)


def running(hp: Hyperparameters = HP, strategy: str = "sweep", **fields: Any) -> State:
    state = State(started_at=0.0)
    dataset = DatasetUploaded(
        dataset_id="d", owner_id="u", name="d", uri="file:///blobs/datasets/d.csv", sha256=SHA, size_bytes=1,
        rows=100, features=4, classes=3, label_column="label",
    )  # fmt: skip
    state = replay(state, dataset, PeerRegistered(peer_id="a", name="a", device="cpu"), PeerWentOnline(peer_id="a"))
    request = session_requested("s", 1, hp, strategy=strategy, dataset_uri="file:///blobs/datasets/d.csv", **fields)
    shards = {"a": 0} if strategy == "fedavg" else {}
    state = replay(
        state,
        request,
        PeerLocked(peer_id="a", session_id="s"),
        SessionStarted(session_id="s", assignments={"a": hp}, shards=shards),
    )
    return observe_presence(state, Presence(peer_id="a", name="a", device="cpu"), 0.0)


def saved(epoch: int = 3, **fields: Any) -> CheckpointSaved:
    values: dict[str, Any] = {
        "event_id": f"s.a.train.1.checkpoint{epoch}",
        "session_id": "s",
        "peer_id": "a",
        "epoch": epoch,
        "uri": f"{CKPT}/{epoch}.safetensors",
        "sha256": SHA,
        "nbytes": 1000,
        "occurred_at": WHEN,
    }
    return CheckpointSaved(**{**values, **fields})


def refused(state: State, report: CheckpointSaved, sender: str = "a") -> str:
    outcome = check(state, sender, report, CONFIG)
    assert isinstance(outcome, ReportRejected), "accepted"
    return outcome.reason


def test_a_sweep_train_carries_the_puts_of_its_checkpoint_epochs_and_none_after_the_last() -> None:
    state = running()
    train = train_command(state.sessions["s"].request, "a", HP, 0, 1, Clocks(now=0, wall=WALL), CONFIG)
    assert train.checkpoints_uri == CKPT
    assert sorted(train.checkpoint_urls) == [3, 6, 9]
    assert train.checkpoint_urls[3].startswith("https://signed/PUT/sessions/s/checkpoints/a/3.safetensors?max=")
    assert train.resume_epoch == 0 and train.resume_uri == "" and train.resume_url == ""
    plain = train_command(state.sessions["s"].request, "a", msgspec.structs.replace(HP, checkpoint_every=0), 0, 1,
                          Clocks(now=0, wall=WALL), CONFIG)  # fmt: skip
    assert plain.checkpoint_urls == {} and plain.checkpoints_uri == ""
    long = msgspec.structs.replace(HP, epochs=100_000, checkpoint_every=1)
    capped = train_command(state.sessions["s"].request, "a", long, 0, 1, Clocks(now=0, wall=WALL), CONFIG)
    assert len(capped.checkpoint_urls) == MAX_CHECKPOINT_URLS and min(capped.checkpoint_urls) == 1


def test_a_fedavg_train_carries_no_checkpoints_its_rounds_are() -> None:
    state = running(strategy="fedavg")
    train = train_command(state.sessions["s"].request, "a", HP, 0, 1, Clocks(now=0, wall=WALL), CONFIG)
    assert train.checkpoint_urls == {} and train.checkpoints_uri == ""
    assert "sweep" in refused(state, saved())


def test_a_true_checkpoint_is_a_fact_and_the_rest_are_refused_with_reasons() -> None:
    state, report = running(), saved()
    assert check(state, "a", report, CONFIG) is report
    assert "in the name of" in refused(state, saved(), sender="b")
    assert "every 3 epochs" in refused(state, saved(4, uri=f"{CKPT}/4.safetensors"))
    assert "not the last" in refused(
        running(msgspec.structs.replace(HP, epochs=9)), saved(9, uri=f"{CKPT}/9.safetensors")
    )
    assert "not the checkpoint URI" in refused(state, saved(uri="file:///blobs/sessions/other/x.safetensors"))
    assert "not the checkpoint URI" in refused(state, saved(uri=f"{CKPT}/6.safetensors"))
    assert "sha256" in refused(state, saved(sha256="nope"))
    assert "at most" in refused(state, saved(nbytes=10**12))
    assert "at most" in refused(state, saved(nbytes=0))
    assert "every 0 epochs" in refused(running(msgspec.structs.replace(HP, checkpoint_every=0)), saved())
    later = replay(state, saved(6, uri=f"{CKPT}/6.safetensors"))
    assert "last checkpoint is of epoch 6" in refused(later, saved(3))  # epochs only move on


def test_a_re_sent_train_resumes_from_the_last_checkpoint() -> None:
    last = saved(6, uri=f"{CKPT}/6.safetensors", sha256="ef" * 32)
    state = replay(running(), saved(3), last, saved(3))  # an earlier one after it changes nothing
    assert state.sessions["s"].runs["a"].checkpoint is last
    state = observe_presence(state, Presence(peer_id="a", name="a", device="cpu"), 11.0)  # restarted: no Train named
    sent = [a for a in decide(state, Clocks(now=12.0, wall=WALL + 12.0), CONFIG) if isinstance(a, Send)]
    assert len(sent) == 1
    train = sent[0].command
    assert sent[0].msg_id == "s.a.train.1.resend.1" and train.event_id == "s.a.train.1"
    assert (train.resume_epoch, train.resume_uri, train.resume_sha256) == (6, f"{CKPT}/6.safetensors", "ef" * 32)
    assert train.resume_url == "https://signed/GET/sessions/s/checkpoints/a/6.safetensors"
    assert sorted(train.checkpoint_urls) == [9]  # its next checkpoints only


def idle_spare(state: State) -> State:
    state = replay(state, PeerRegistered(peer_id="z", name="z", device="cpu"), PeerWentOnline(peer_id="z"))
    return observe_presence(state, Presence(peer_id="z", name="z", device="cpu"), 0.0)


def test_a_failed_run_with_a_checkpoint_is_taken_over_by_an_idle_peer_from_that_checkpoint() -> None:
    last = saved(6, uri=f"{CKPT}/6.safetensors")
    state = replay(idle_spare(running()), saved(3), last, PeerFailed(session_id="s", peer_id="a", reason="gone"))
    (moved,) = [a for a in decide(state, Clocks(now=1.0, wall=WALL + 1.0), CONFIG) if isinstance(a, Reassign)]
    assert (moved.moved.from_peer_id, moved.moved.to_peer_id, moved.lock.event.peer_id) == ("a", "z", "z")
    train = moved.train
    assert (train.peer_id, train.hyperparameters, train.resume_epoch, train.resume_uri) == ("z", HP, 6, last.uri)
    assert train.checkpoints_uri == "file:///blobs/sessions/s/checkpoints/z" and sorted(train.checkpoint_urls) == [9]
    taken = replay(state, PeerLocked(peer_id="z", session_id="s"), moved.moved)
    run = taken.sessions["s"].runs["z"]
    assert (run.status, run.hyperparameters, run.checkpoint) == ("training", HP, last)
    assert not [a for a in decide(taken, Clocks(now=1.0, wall=WALL + 1.0), CONFIG) if isinstance(a, Reassign)]
    # the newcomer's checkpoints go on after the one it took over
    ckpt_z = "file:///blobs/sessions/s/checkpoints/z"
    assert "last checkpoint is of epoch 6" in refused(taken, saved(3, peer_id="z", uri=f"{ckpt_z}/3.safetensors"), "z")
    nine = saved(9, peer_id="z", event_id="s.z.train.1.checkpoint9", uri=f"{ckpt_z}/9.safetensors")
    assert check(taken, "z", nine, CONFIG) is nine


def test_a_failed_run_without_a_checkpoint_fails_alone_as_before() -> None:
    failed = PeerFailed(session_id="s", peer_id="a", reason="gone")
    state = replay(idle_spare(running()), failed)
    assert not [a for a in decide(state, Clocks(now=1.0, wall=WALL + 1.0), CONFIG) if isinstance(a, Reassign)]
    keep = replay(idle_spare(running(on_peer_failure="continue")), saved(3), failed)
    assert not [a for a in decide(keep, Clocks(now=1.0, wall=WALL + 1.0), CONFIG) if isinstance(a, Reassign)]


def test_a_session_whose_only_run_is_taken_over_does_not_end_in_that_decision() -> None:
    state = replay(idle_spare(running()), saved(3), PeerFailed(session_id="s", peer_id="a", reason="gone"))
    actions = decide(state, Clocks(now=1.0, wall=WALL + 1.0), CONFIG)
    assert [a for a in actions if isinstance(a, Reassign)]
    assert not [a for a in actions if isinstance(a, Append) and isinstance(a.event, SessionFailed | SessionCompleted)]


@pytest.mark.parametrize("every", [-1, 100_001, 1.5, "2"])
def test_checkpoint_every_out_of_the_contract_is_refused(every: object) -> None:
    with pytest.raises(msgspec.ValidationError, match="checkpoint_every"):
        msgspec.convert({"epochs": 2, "batch_size": 8, "lr": 0.1, "checkpoint_every": every}, Hyperparameters)
