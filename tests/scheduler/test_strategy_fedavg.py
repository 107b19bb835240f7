"""The fedavg strategy's rules as plain calls: shards, rounds and their deadlines, failed
participants, the agreed model. (Whole-session stories are in test_rounds.py.)"""

from __future__ import annotations

from dataclasses import replace

import msgspec

from swarmtrain.common.events import Hyperparameters, RoundUpdate
from swarmtrain.scheduler.actions import Append, Clocks, Config, Reassign, Timing
from swarmtrain.scheduler.state import Peer, Run, Session
from swarmtrain.scheduler.strategies import strategy_of
from swarmtrain.scheduler.strategies.fedavg import round_deadline
from tests.factories import session_requested

FEDAVG = strategy_of("fedavg")
HPS = [Hyperparameters(epochs=e, batch_size=8, lr=0.01) for e in (1, 2, 3)]
TIMING = Timing(first_round_timeout=600, round_factor=3, round_min=10)
CONFIG = Config(uri=lambda key: f"s3://bucket/{key}", timing=TIMING)


def session(on_failure: str = "reassign", **fields: object) -> Session:
    request = session_requested("s", 3, strategy="fedavg", rounds=2, on_peer_failure=on_failure)
    request = msgspec.structs.replace(request, hyperparameters=HPS)
    runs = {p: Run(hyperparameters=HPS[i], shard=i) for i, p in enumerate("abc")}
    values: dict[str, object] = {"status": "running", "runs": runs, "round": 1, "round_opened": 100.0}
    values["round_base"] = 100.0
    return Session(request=request, **{**values, **fields})  # type: ignore[arg-type]


def _with(s: Session, peer: str, **changes: object) -> Session:
    return replace(s, runs={**s.runs, peer: replace(s.runs[peer], **changes)})  # type: ignore[arg-type]


def update(peer: str) -> RoundUpdate:
    return RoundUpdate(peer_id=peer, uri=f"u/{peer}", sha256=peer, num_samples=10)


def test_peer_i_trains_shard_i_with_the_i_th_hyperparameters() -> None:
    assignment = FEDAVG.assign(session().request, ["x", "y", "z"])
    assert assignment.hyperparameters == {"x": HPS[0], "y": HPS[1], "z": HPS[2]}
    assert assignment.shards == {"x": 0, "y": 1, "z": 2}


def test_the_deadline_counts_from_the_observed_times_only() -> None:
    assert round_deadline(session(), TIMING) == 600  # nothing seen yet
    assert round_deadline(session(first_update=102.0), TIMING) == 10  # 3 x 2 s, but at least 10 s
    assert round_deadline(session(first_update=120.0), TIMING) == 60  # 3 x the first update's 20 s
    assert round_deadline(session(longest_round=30.0, first_update=101.0), TIMING) == 90


def test_a_round_closes_at_its_deadline_without_the_stragglers() -> None:
    s = session(first_update=120.0, updates={"a": update("a")})
    assert FEDAVG.step(s, [], Clocks(now=0.0, wall=159.0), CONFIG) == []
    events = [a.event for a in FEDAVG.step(s, [], Clocks(now=0.0, wall=161.0), CONFIG) if isinstance(a, Append)]
    assert [(type(e).__name__, getattr(e, "peer_id", None)) for e in events] == [
        ("PeerFailed", "b"),
        ("PeerFailed", "c"),
        ("RoundClosed", None),
    ]
    assert [e.event_id for e in events] == ["s.b.failed", "s.c.failed", "s.r1.closed"]


def test_a_failed_participant_hands_its_shard_with_its_train_to_an_idle_peer() -> None:
    s = _with(session(round=2), "b", status="failed")
    idle = [Peer(peer_id="spare", online=True, seq=7)]
    [action] = FEDAVG.step(s, idle, Clocks(now=0.0, wall=101.0), CONFIG)
    assert isinstance(action, Reassign)
    assert (action.lock.event.peer_id, action.lock.event.session_id, action.lock.expected) == ("spare", "s", 7)
    moved, train = action.moved, action.train
    assert (moved.shard, moved.from_peer_id, moved.to_peer_id, moved.round) == (1, "b", "spare", 2)
    assert (train.peer_id, train.shard, train.start_round, train.hyperparameters) == ("spare", 1, 2, HPS[1])
    assert (train.num_shards, train.rounds, train.strategy) == (3, 2, "fedavg")
    assert train.output_uri == "s3://bucket/sessions/s/models/spare.safetensors"
    assert train.rounds_uri == "s3://bucket/sessions/s/rounds"


def test_a_shard_is_never_handed_to_a_peer_that_already_ran_in_the_session() -> None:
    s = _with(session(round=2), "b", status="failed")
    back = [Peer(peer_id="b", online=True, seq=9)]  # the failed peer itself, online again
    assert [type(a).__name__ for a in FEDAVG.step(s, back, Clocks(now=0.0, wall=101.0), CONFIG)] == []
    [action] = FEDAVG.step(s, [*back, Peer(peer_id="spare", online=True)], Clocks(now=0.0, wall=101.0), CONFIG)
    assert isinstance(action, Reassign) and action.moved.to_peer_id == "spare"


def test_on_peer_failure_continue_and_fail() -> None:
    clocks = Clocks(now=0.0, wall=101.0)
    idle = [Peer(peer_id="spare", online=True)]
    assert FEDAVG.step(_with(session("continue"), "b", status="failed"), idle, clocks, CONFIG) == []
    [action] = FEDAVG.step(_with(session("fail"), "b", status="failed"), idle, clocks, CONFIG)
    assert isinstance(action, Append) and type(action.event).__name__ == "SessionFailed"
    assert action.event.event_id == "s.failed"


def test_the_model_is_the_one_most_peers_agree_on() -> None:
    s = session()
    for peer, sha, acc in (("a", "same", 0.5), ("b", "same", 0.6), ("c", "forged", 0.99)):
        s = _with(s, peer, status="done", model_uri=f"u/{peer}", model_sha256=sha, val_accuracy=acc)
    assert FEDAVG.model(s) == "b"
    assert FEDAVG.model(session()) is None  # nothing finished
