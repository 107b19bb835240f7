"""The scheduler's decisions as plain function calls: no broker, no clock but the one passed in."""

from __future__ import annotations

from swarmtrain.common.events import (
    DatasetUploaded,
    DataSpec,
    Event,
    Heartbeat,
    Hyperparameters,
    ModelEvaluated,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOffline,
    PeerWentOnline,
    Presence,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionRequested,
    SessionStarted,
)
from swarmtrain.common.models import TransformerSpec
from swarmtrain.scheduler.actions import (
    Action,
    Append,
    AppendIf,
    Clocks,
    Config,
    Evaluate,
    Forward,
    Send,
    Start,
    Timing,
)
from swarmtrain.scheduler.decide import decide, recover
from swarmtrain.scheduler.state import State, observe_presence
from tests.factories import session_requested
from tests.scheduler.helpers import replay

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)
TIMEOUT = 5.0
CONFIG = Config(uri=lambda key: f"file:///blobs/{key}", timing=Timing(peer_timeout=TIMEOUT))


def decided(state: State, now: float) -> list[Action]:
    return decide(state, Clocks(now=now, wall=1_000.0), CONFIG)


def starts(actions: list[Action]) -> list[tuple[str, tuple[str, ...]]]:
    return [(a.session_id, a.peer_ids) for a in actions if isinstance(a, Start)]


def requested(sid: str = "s1", n: int = 2) -> SessionRequested:
    return session_requested(sid, n)


def online(*peer_ids: str) -> list[Event]:
    out: list[Event] = []
    for p in peer_ids:
        out += [PeerRegistered(peer_id=p, name=p, device="cpu"), PeerWentOnline(peer_id=p)]
    return out


def beating(state: State, now: float, *peer_ids: str) -> State:
    for p in peer_ids:
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu"), now)
    return state


def running(sid: str = "s1") -> State:
    state = replay(*online("a", "b", "c"), requested(sid))
    state = replay(
        PeerLocked(peer_id="a", session_id=sid),
        PeerLocked(peer_id="b", session_id=sid),
        SessionStarted(session_id=sid, assignments={"a": HP, "b": HP}),
        state=state,
    )
    return beating(state, 0.0, "a", "b", "c")


def appended(actions: list[Action]) -> list[Event]:
    return [a.event for a in actions if isinstance(a, Append)]


def summary(actions: list[Action]) -> list[tuple[str, str | None, str | None]]:
    """What each action is and whom it concerns, without ids and timestamps."""
    out: list[tuple[str, str | None, str | None]] = []
    for a in actions:
        if isinstance(a, Forward):
            out.append((f"Forward {type(a.fact).__name__}", a.peer_id, a.fact.session_id))
            continue
        m = a.event if isinstance(a, Append) else a.command if isinstance(a, Send) else a
        out.append((type(m).__name__, getattr(m, "peer_id", None), getattr(m, "session_id", None)))
    return out


def evaluated(state: State, figures: dict[str, float | None]) -> State:
    """The scheduler's own evaluations (``figures``: what it measures of each peer's model), appended
    as the shell appends them, until the decision asks for no more."""
    while asks := [a for a in decided(state, 1.0) if isinstance(a, Evaluate)]:
        state = replay(
            *(
                ModelEvaluated(
                    session_id=a.session_id, peer_id=a.peer_id, val_accuracy=figures[a.peer_id], model_sha256=a.sha256
                )
                for a in asks
            ),
            state=state,
        )
    return state


def done(peer: str, acc: float | None, sid: str = "s1") -> PeerDone:
    return PeerDone(
        session_id=sid,
        peer_id=peer,
        model_uri=f"file:///{peer}",
        model_sha256="0",
        epochs=1,
        loss=0.1,
        accuracy=0.9,
        val_loss=0.2,
        val_accuracy=acc,
        train_seconds=1.0,
    )


def test_queued_session_starts_on_the_idle_online_peers() -> None:
    state = beating(replay(*online("b", "a", "c"), requested(n=2)), 0.0, "a", "b", "c")
    assert starts(decided(state, 1.0)) == [("s1", ("a", "b"))]


def test_session_waits_queued_while_too_few_peers_are_idle() -> None:
    state = beating(replay(*online("a"), requested(n=2)), 0.0, "a")
    assert decided(state, 1.0) == []
    state = beating(replay(*online("b"), state=state), 1.0, "b")
    assert starts(decided(state, 1.5)) == [("s1", ("a", "b"))]


def test_locked_or_offline_peers_are_not_idle() -> None:
    state = running()
    state = replay(requested("s2", n=2), state=state)
    assert not starts(decided(state, 1.0))  # only c is idle


def test_presence_marks_peers_online_and_silence_marks_them_offline() -> None:
    state = State(started_at=0.0)
    state = beating(replay(PeerRegistered(peer_id="a", name="a", device="cpu"), state=state), 0.0, "a")
    assert summary(decided(state, 1.0)) == [("PeerWentOnline", "a", None)]
    state = replay(PeerWentOnline(peer_id="a"), state=state)
    assert decided(state, TIMEOUT - 0.1) == []
    events = appended(decided(state, TIMEOUT + 0.1))
    assert [type(e) for e in events] == [PeerWentOffline]


def test_a_peer_known_from_the_log_gets_a_grace_period_after_a_restart() -> None:
    state = replay(*online("a"), state=State(started_at=100.0))
    assert decided(state, 100.0 + TIMEOUT - 1) == []
    assert [type(e) for e in appended(decided(state, 100.0 + TIMEOUT + 1))] == [PeerWentOffline]


def test_training_peer_that_goes_silent_fails_its_run() -> None:
    state = beating(running(), 10.0, "b", "c")
    events = appended(decided(state, 10.0))
    assert [type(e) for e in events] == [PeerWentOffline, PeerFailed]
    assert events[1].peer_id == "a" and events[1].session_id == "s1"  # type: ignore[union-attr]


def test_session_completes_with_the_best_peer_when_every_run_ended() -> None:
    state = replay(done("a", 0.8), state=running())
    assert summary(decided(state, 1.0)) == [("PeerReleased", "a", "s1")]
    state = replay(done("b", 0.9), state=state)
    assert [(a.peer_id, a.model_uri) for a in decided(state, 1.0) if isinstance(a, Evaluate)] == [("b", "file:///b")]
    state = evaluated(state, {"a": 0.8, "b": 0.89})
    [completed] = [e for e in appended(decided(state, 1.0)) if isinstance(e, SessionCompleted)]
    assert (completed.best_peer_id, completed.best_val_accuracy, completed.model_uri) == ("b", 0.9, "file:///b")
    assert completed.checked_val_accuracy == 0.89
    assert list(state.sessions["s1"].evaluations) == ["b"]  # a's claim (0.8) cannot beat b's checked 0.89


def test_a_completed_session_releases_its_peers_before_it_is_shown_completed() -> None:
    """The end-of-session order: the releases are appended before ``SessionCompleted`` in the one
    decision that completes it, so the read models (which apply the log in order) never show the
    session completed while its peers are still held; nothing is left to release afterwards."""
    state = replay(done("a", 0.8), done("b", 0.9), state=running())
    state = evaluated(state, {"b": 0.89})
    actions = decided(state, 1.0)
    kinds = [type(e).__name__ for e in appended(actions)]
    assert kinds == ["PeerReleased", "PeerReleased", "SessionCompleted"]
    assert {e.peer_id for e in appended(actions) if isinstance(e, PeerReleased)} == {"a", "b"}
    # the end is still told to both peers, in the same decision
    assert sorted(x for x in summary(actions) if x[0].startswith("Forward")) == [
        ("Forward SessionCompleted", "a", "s1"),
        ("Forward SessionCompleted", "b", "s1"),
    ]
    state = replay(*appended(actions), state=state)
    assert all(p.session_id is None for p in state.peers.values())
    assert [a for a in decided(state, 1.0) if isinstance(a, Append)] == []


def test_a_session_ended_by_a_strategy_releases_first_too() -> None:
    state = replay(done("a", 0.8), PeerFailed(session_id="s1", peer_id="b", reason="x"), state=running())
    state = evaluated(state, {"a": None})  # its model fails the scheduler's check: nothing wins
    kinds = [type(e).__name__ for e in appended(decided(state, 1.0))]
    assert kinds[-1] == "SessionFailed" and kinds.count("PeerReleased") == 2


def test_session_with_a_failed_peer_completes_with_the_others() -> None:
    state = replay(PeerFailed(session_id="s1", peer_id="a", reason="boom"), done("b", 0.5), state=running())
    state = evaluated(state, {"b": 0.5})
    [completed] = [e for e in appended(decided(state, 1.0)) if isinstance(e, SessionCompleted)]
    assert completed.best_peer_id == "b"


def test_session_fails_when_every_peer_failed() -> None:
    state = replay(
        PeerFailed(session_id="s1", peer_id="a", reason="x"),
        PeerFailed(session_id="s1", peer_id="b", reason="y"),
        state=running(),
    )
    # the peers are released before the session is shown failed, in the same decision
    assert [type(e) for e in appended(decided(state, 1.0))] == [PeerReleased, PeerReleased, SessionFailed]


def test_ended_session_stops_and_releases_its_peers() -> None:
    state = replay(done("a", 0.8), SessionCancelled(session_id="s1"), state=running())
    actions = decided(state, 1.0)
    assert sorted(summary(actions)) == [
        ("Forward SessionCancelled", "a", "s1"),  # the end, told to every peer the session held
        ("Forward SessionCancelled", "b", "s1"),
        ("PeerReleased", "a", "s1"),
        ("PeerReleased", "b", "s1"),
        ("Stop", "b", "s1"),
    ]
    state = replay(*appended(actions), state=state)
    assert decided(state, 1.0) == []


def test_heartbeats_and_late_events_do_not_change_ended_runs() -> None:
    state = replay(
        done("a", 0.8),
        Heartbeat(session_id="s1", peer_id="a", epoch=9, epochs=9, loss=1, accuracy=0, samples_per_s=1),
        state=running(),
    )
    assert state.sessions["s1"].runs["a"].status == "done"
    assert state.sessions["s1"].runs["a"].epoch == 1


def test_evolve_tracks_subject_sequences_for_compare_and_set() -> None:
    state = replay(*online("a"), requested())
    assert state.peers["a"].seq == 2
    assert state.sessions["s1"].seq == 3
    assert state.position == 3


def test_stale_locks_of_a_session_that_never_started_are_released_at_start_up_with_compare_and_set() -> None:
    state = replay(*online("a"), requested(n=2), PeerLocked(peer_id="a", session_id="s1"))
    stale = CONFIG.timing.stale_lock
    assert recover(state, Clocks(now=0.0, wall=stale), CONFIG) == []  # young: maybe a start in progress elsewhere
    [release] = [a for a in recover(state, Clocks(now=0.0, wall=stale + 1), CONFIG) if isinstance(a, AppendIf)]
    assert (release.event.peer_id, release.event.session_id, release.expected) == ("a", "s1", state.peers["a"].seq)  # type: ignore[union-attr]
    assert release.event.event_id == f"s1.a.released.{state.peers['a'].lock_seq}"


def test_a_corpus_session_counts_the_windows_of_its_models_context() -> None:
    corpus = DatasetUploaded(
        dataset_id="d",
        owner_id="u",
        name="c.txt",
        uri="file:///d.text",
        sha256="0",
        size_bytes=3201,
        rows=100,
        features=0,
        classes=0,
        label_column="text",
        format="text",
        tokens=3201,
        target="language_modeling",
    )
    data = DataSpec(format="text", task="language_modeling", context=32)
    model = TransformerSpec(layers=1, d_model=16, heads=2, context=32)
    request = session_requested(num_peers=2, strategy="fedavg", rounds=2, model=model, data=data)
    session = replay(corpus, request).sessions["s1"]
    assert session.dataset is not None and (session.dataset.rows, session.dataset.features) == (100, 32)
    assert session.training_rows() == 80 and session.training_rows(0) == 40  # windows, not lines
    assert session.param_count() == model.parameter_count(session.data_shape())  # type: ignore[arg-type]
    assert session.param_count() > 256 * 16  # the tied embedding of the byte vocabulary
    assert session.data_bytes() == 100 * 32 * (4 + 8)  # float32 ids and int64 next tokens a window
