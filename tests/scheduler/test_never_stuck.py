"""Never stuck (issue 11), as plain calls: a ``Train`` is re-sent until a beat shows the peer working
on it and the run fails after too many re-sends; a gap in the scheduler's reading counts against
no peer; a diverged run fails with its reason and the sweep goes on; stale locks are released with
compare-and-set; an event that cannot be applied is quarantined. Plus what a peer is handed: signed
URLs in its ``Train``, the facts it needs as ``Forward``s."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from swarmtrain.common.events import (
    DatasetUploaded,
    Event,
    Heartbeat,
    Hyperparameters,
    ModelEvaluated,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerWentOffline,
    PeerWentOnline,
    Presence,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SessionCompleted,
    SessionStarted,
    ShardReassigned,
)
from swarmtrain.scheduler.actions import (
    Action,
    Append,
    AppendIf,
    Clocks,
    Config,
    Evaluate,
    Forward,
    Method,
    Send,
    Start,
    Timing,
    session_fact,
)
from swarmtrain.scheduler.decide import decide
from swarmtrain.scheduler.reports import check
from swarmtrain.scheduler.state import State, fold_safely, observe_presence, regrace
from tests.factories import session_requested
from tests.scheduler import helpers

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)
TIMING = Timing(peer_timeout=5.0, resend_after=10.0, max_resends=3, stale_lock=30.0, first_round_timeout=1e9)
WALL = 1_000_000.0
SHA = "cd" * 32


def sign(method: Method, key: str, max_bytes: int | None) -> str:
    return f"https://signed/{method}/{key}" + ("" if max_bytes is None else f"?max={max_bytes}")


CONFIG = Config(uri=lambda key: f"file:///blobs/{key}", timing=TIMING, signer=sign)


replay = functools.partial(helpers.replay, observed_at=WALL)


def beat(state: State, now: float, *peers: str, train: str | None = None) -> State:
    for p in peers:
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu", train_id=train), now)
    return state


def decided(state: State, now: float, wall: float | None = None) -> list[Action]:
    return decide(state, Clocks(now=now, wall=WALL + now if wall is None else wall), CONFIG)


def appended(actions: Sequence[Action]) -> list[Event]:
    return [a.event for a in actions if isinstance(a, Append)]


def running(strategy: str = "sweep", peers: str = "ab", rounds: int = 1) -> State:
    """A session started at WALL (monotonic 0) on ``peers``, every one online and beating at 0."""
    state = State(started_at=0.0)
    dataset = DatasetUploaded(
        dataset_id="d", owner_id="u", name="d", uri="file:///blobs/datasets/d.csv", sha256=SHA, size_bytes=1,
        rows=100, features=4, classes=3, label_column="label",
    )  # fmt: skip
    state = replay(state, dataset)
    for p in (*peers, "spare"):
        state = replay(state, PeerRegistered(peer_id=p, name=p, device="cpu"), PeerWentOnline(peer_id=p))
    request = session_requested(
        "s", len(peers), HP, strategy=strategy, rounds=rounds, dataset_uri="file:///blobs/datasets/d.csv"
    )
    shards = {p: i for i, p in enumerate(peers)} if strategy == "fedavg" else {}
    state = replay(
        state,
        request,
        *(PeerLocked(peer_id=p, session_id="s") for p in peers),
        SessionStarted(session_id="s", assignments=dict.fromkeys(peers, HP), shards=shards),
    )
    return beat(state, 0.0, *peers, "spare")


def resends(actions: Sequence[Action]) -> list[tuple[str, str, str | None]]:
    return [(a.command.peer_id, a.command.event_id, a.msg_id) for a in actions if isinstance(a, Send)]


def test_a_train_no_beat_shows_at_work_is_re_sent_as_the_same_command_under_a_fresh_id() -> None:
    state = running()
    assert resends(decided(beat(state, 9.0, "a", "b"), 9.0)) == []  # within resend_after
    state = beat(state, 11.0, "a", "b")  # beating, but naming no Train
    assert resends(decided(state, 12.0)) == [
        ("a", "s.a.train.1", "s.a.train.1.resend.1"),
        ("b", "s.b.train.1", "s.b.train.1.resend.1"),
    ]
    assert resends(decided(beat(state, 21.0, "a", "b"), 21.0)) == [
        ("a", "s.a.train.1", "s.a.train.1.resend.2"),  # the next re-send: another id, so JetStream stores it
        ("b", "s.b.train.1", "s.b.train.1.resend.2"),
    ]
    at_work = beat(state, 21.0, "a", train="s.a.train.1")  # a's beat names its Train: a is at work
    assert resends(decided(beat(at_work, 21.0, "b"), 21.0)) == [("b", "s.b.train.1", "s.b.train.1.resend.2")]
    assert decided(state, 12.0) == decided(state, 12.0)  # the same decision, ids included


def test_a_peer_never_seen_at_work_fails_its_run_after_the_resends_and_the_sweep_goes_on() -> None:
    state = beat(running(), 41.0, "a", "b")
    state = beat(state, 41.0, "a", train="s.a.train.1")
    state = beat(state, 41.0, "b", train="s.other.train.1")  # b works on something else
    actions = decided(state, 41.0)
    [failed] = [e for e in appended(actions) if isinstance(e, PeerFailed)]
    assert failed.peer_id == "b" and "after 3 re-sends" in failed.reason and "s.other.train.1" in failed.reason
    assert resends(actions) == []
    state = replay(state, failed)
    state = replay(state, done("a", 0.7))
    state = replay(state, *evaluations(state, 41.0, {"a": 0.7}))
    [completed] = [e for e in appended(decided(state, 41.0)) if isinstance(e, SessionCompleted)]
    assert completed.best_peer_id == "a" and completed.checked_val_accuracy == 0.7


def test_a_diverged_run_fails_with_its_reason_and_the_sweep_completes_with_the_others() -> None:
    state = running(peers="abc")
    diverged = PeerFailed(event_id="s.b.failed", session_id="s", peer_id="b", reason="diverged: non-finite loss at 2")
    assert check(state, "b", diverged, CONFIG) is diverged  # the report becomes the fact as is
    state = replay(state, diverged, done("a", 0.6), done("c", 0.9))
    assert state.sessions["s"].runs["b"].status == "failed"
    state = replay(state, *evaluations(state, 1.0, {"a": 0.6, "c": 0.85}))
    [completed] = [e for e in appended(decided(state, 1.0)) if isinstance(e, SessionCompleted)]
    assert (completed.best_peer_id, completed.best_val_accuracy, completed.checked_val_accuracy) == ("c", 0.9, 0.85)


def test_after_a_gap_in_reading_no_peer_is_failed_for_beats_the_scheduler_could_not_see() -> None:
    state = beat(running(), 10.0, "a", "b", "spare", train=None)
    state = beat(state, 10.0, "a", train="s.a.train.1")
    state = beat(state, 10.0, "b", train="s.b.train.1")
    outage = [type(e).__name__ for e in appended(decided(state, 30.0))]
    assert outage.count("PeerWentOffline") == 3 and outage.count("PeerFailed") == 2  # without grace: a mass failure
    graced = regrace(state, 30.0)  # the shell saw its reconnect, or a gap in its own reading
    assert decided(graced, 30.0) == [] and decided(graced, 34.9) == []
    assert [type(e) for e in appended(decided(graced, 35.1))].count(PeerWentOffline) == 3  # the bound still holds
    resumed = beat(graced, 31.0, "a", "spare", train=None)
    resumed = beat(resumed, 31.0, "a", train="s.a.train.1")
    resumed = beat(resumed, 31.0, "b", train="s.b.train.1")
    assert decided(resumed, 35.1) == []


def test_a_grace_also_restarts_the_wait_for_a_beat_naming_the_train() -> None:
    state = regrace(beat(running(), 30.0, "a", "b"), 25.0)
    assert resends(decided(state, 30.0)) == []  # 5 s since the grace, not 30 since the start
    assert len(resends(decided(beat(state, 36.0, "a", "b"), 36.0))) == 2


def test_stale_locks_are_released_with_compare_and_set_and_ids_of_their_lock() -> None:
    state = State(started_at=0.0)
    state = replay(
        state,
        PeerRegistered(peer_id="a", name="a", device="cpu"),
        session_requested("q", 2),
        PeerLocked(peer_id="a", session_id="q"),  # its start's SessionStarted never landed
    )
    assert not [a for a in decided(state, 0.0, wall=WALL + 30.0) if isinstance(a, AppendIf)]
    [release] = [a for a in decided(state, 0.0, wall=WALL + 31.0) if isinstance(a, AppendIf)]
    assert release.expected == state.peers["a"].seq
    assert release.event.event_id == f"q.a.released.{state.peers['a'].lock_seq}"
    relocked = replay(state, release.event, PeerLocked(peer_id="a", session_id="q"))
    [again] = [a for a in decided(relocked, 0.0, wall=WALL + 31.0) if isinstance(a, AppendIf)]
    assert again.event.event_id != release.event.event_id  # one id per lock


def test_an_event_that_cannot_be_applied_is_quarantined_and_the_rest_is_applied() -> None:
    state = running("fedavg", rounds=2)
    bad = ShardReassigned(session_id="s", shard=99, from_peer_id="a", to_peer_id="spare", round=1)
    good = Heartbeat(session_id="s", peer_id="a", epoch=1, epochs=2, loss=1, accuracy=0.5, samples_per_s=1)
    items: list[tuple[int, Event, float]] = [(state.position + 1, bad, WALL), (state.position + 2, good, WALL)]
    after, quarantined = fold_safely(state, items)
    assert [(seq, type(e).__name__) for seq, e, _ in quarantined] == [(state.position + 1, "ShardReassigned")]
    assert "IndexError" in quarantined[0][2]
    assert after.position == state.position + 2 and after.sessions["s"].runs["a"].epoch == 1
    assert "spare" not in after.sessions["s"].runs


def test_a_train_carries_signed_urls_of_exactly_what_the_peer_reads_and_writes() -> None:
    state = running("fedavg", rounds=2)  # a and b busy; spare idle
    request = session_requested("n", 1, HP, strategy="fedavg", rounds=2, dataset_uri="file:///blobs/datasets/d.csv")
    state = replay(state, request)
    [start] = [a for a in decided(state, 0.0) if isinstance(a, Start)]
    [train] = start.trains
    assert train.peer_id == "spare" and train.dataset_url == "https://signed/GET/datasets/d.csv"
    limit = state.sessions["n"].max_model_bytes()
    put = f"https://signed/PUT/sessions/n/%s?max={limit}"
    assert train.output_url == put % "models/spare.safetensors"
    assert train.update_urls == {r: put % f"rounds/{r}/spare.safetensors" for r in (1, 2)}
    assert train.average_urls == {r: put % f"rounds/{r}/average.safetensors" for r in (1, 2)}
    assert 1 << 20 < limit < 1 << 22  # the default mlp on 4 features and 3 classes, with room for its header


def test_participants_get_the_facts_they_need_and_a_newcomer_the_earlier_rounds() -> None:
    state = running("fedavg", rounds=3)
    rounds = "file:///blobs/sessions/s/rounds"

    def close(state: State, r: int) -> State:
        updates = [RoundUpdate(peer_id=p, uri=f"{rounds}/{r}/{p}.safetensors", sha256=SHA, num_samples=1) for p in "ab"]
        closed = RoundClosed(event_id=f"s.r{r}.closed", session_id="s", round=r, updates=updates)
        averaged = RoundAveraged(
            event_id=f"s.r{r}.averaged", session_id="s", round=r, uri=f"{rounds}/{r}/average.safetensors", sha256=SHA,
            peer_id="a",
        )  # fmt: skip
        return replay(state, closed, averaged)

    state = close(state, 1)
    forwards = [(a.peer_id, a.fact.event_id) for a in decided(state, 1.0) if isinstance(a, Forward)]
    assert forwards == [("a", "s.r1.closed"), ("a", "s.r1.averaged"), ("b", "s.r1.closed"), ("b", "s.r1.averaged")]
    [forward] = [a for a in decided(state, 1.0) if isinstance(a, Forward) and a.peer_id == "a"][:1]
    fact = session_fact(forward, Clocks(now=1.0, wall=WALL), CONFIG)
    assert fact.event_id == "s.r1.closed.to.a" and fact.peer_id == "a" and fact.fact == forward.fact
    assert fact.urls == {
        f"{rounds}/1/{p}.safetensors": f"https://signed/GET/sessions/s/rounds/1/{p}.safetensors" for p in "ab"
    }

    state = close(state, 2)
    state = replay(
        state,
        PeerFailed(session_id="s", peer_id="b", reason="x"),
        PeerLocked(peer_id="spare", session_id="s"),
        ShardReassigned(
            event_id="s.spare.reassigned.1", session_id="s", shard=1, from_peer_id="b", to_peer_id="spare", round=3
        ),
    )
    forwards = [(a.peer_id, a.fact.event_id) for a in decided(state, 1.0) if isinstance(a, Forward)]
    assert ("a", "s.r1.closed") not in forwards  # a founding member already had round 1's facts
    assert [f for p, f in forwards if p == "a"] == ["s.r2.closed", "s.r2.averaged", "s.spare.reassigned.1"]
    assert [f for p, f in forwards if p == "spare"] == [
        "s.r1.closed", "s.r1.averaged", "s.r2.closed", "s.r2.averaged", "s.spare.reassigned.1"
    ]  # fmt: skip


def done(peer: str, claimed: float) -> PeerDone:
    return PeerDone(
        event_id=f"s.{peer}.done", session_id="s", peer_id=peer,
        model_uri=f"file:///blobs/sessions/s/models/{peer}.safetensors", model_sha256=SHA, epochs=1, loss=0.1,
        accuracy=0.9, val_accuracy=claimed, train_seconds=1.0,
    )  # fmt: skip


def evaluations(state: State, now: float, figures: dict[str, float | None]) -> list[ModelEvaluated]:
    """What the shell appends for each ``Evaluate`` until the decision asks for no more."""
    out: list[ModelEvaluated] = []
    while asks := [a for a in decided(state, now) if isinstance(a, Evaluate)]:
        new = [
            ModelEvaluated(session_id="s", peer_id=a.peer_id, val_accuracy=figures[a.peer_id], model_sha256=a.sha256)
            for a in asks
        ]
        out += new
        state = replay(state, *new)
    return out


def test_offline_peers_are_not_re_sent_to_but_failed_by_the_presence_rule() -> None:
    state = replay(running(), PeerWentOffline(peer_id="b"))
    state = beat(state, 12.0, "a", train="s.a.train.1")
    assert resends(decided(state, 12.0)) == []
