"""The scheduler's decisions as plain function calls: no broker, no clock but the one passed in."""

from __future__ import annotations

from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerWentOffline,
    PeerWentOnline,
    Presence,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionRequested,
    SessionStarted,
)
from swarmtrain.scheduler.state import (
    Append,
    Send,
    Start,
    State,
    Timing,
    decide,
    evolve,
    observe_presence,
    stale_locks,
)
from tests.factories import session_requested

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)
TIMEOUT = 5.0
TIMING = Timing(peer_timeout=TIMEOUT)


def requested(sid: str = "s1", n: int = 2) -> SessionRequested:
    return session_requested(sid, n)


def replay(*events: Event, state: State | None = None) -> State:
    state = state or State()
    for event in events:
        evolve(state, state.position + 1, event)
    return state


def online(*peer_ids: str) -> list[Event]:
    out: list[Event] = []
    for p in peer_ids:
        out += [PeerRegistered(peer_id=p, name=p, device="cpu"), PeerWentOnline(peer_id=p)]
    return out


def beating(state: State, now: float, *peer_ids: str) -> State:
    for p in peer_ids:
        observe_presence(state, Presence(peer_id=p, name=p, device="cpu"), now)
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


def appended(actions: list[object]) -> list[Event]:
    return [a.event for a in actions if isinstance(a, Append)]


def summary(actions: list[object]) -> list[tuple[str, str | None, str | None]]:
    """What each action is and whom it concerns, without ids and timestamps."""
    out = []
    for a in actions:
        m = a.event if isinstance(a, Append) else a.command if isinstance(a, Send) else a
        out.append((type(m).__name__, getattr(m, "peer_id", None), getattr(m, "session_id", None)))
    return out


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
    assert decide(state, 1.0, timing=TIMING) == [Start(session_id="s1", peer_ids=("a", "b"))]


def test_session_waits_queued_while_too_few_peers_are_idle() -> None:
    state = beating(replay(*online("a"), requested(n=2)), 0.0, "a")
    assert decide(state, 1.0, timing=TIMING) == []
    state = beating(replay(*online("b"), state=state), 1.0, "b")
    assert decide(state, 1.5, timing=TIMING) == [Start(session_id="s1", peer_ids=("a", "b"))]


def test_locked_or_offline_peers_are_not_idle() -> None:
    state = running()
    state = replay(requested("s2", n=2), state=state)
    assert not [a for a in decide(state, 1.0, timing=TIMING) if isinstance(a, Start)]  # only c is idle


def test_presence_marks_peers_online_and_silence_marks_them_offline() -> None:
    state = State(started_at=0.0)
    state = beating(replay(PeerRegistered(peer_id="a", name="a", device="cpu"), state=state), 0.0, "a")
    assert summary(decide(state, 1.0, timing=TIMING)) == [("PeerWentOnline", "a", None)]
    state = replay(PeerWentOnline(peer_id="a"), state=state)
    assert decide(state, TIMEOUT - 0.1, timing=TIMING) == []
    events = appended(decide(state, TIMEOUT + 0.1, timing=TIMING))
    assert [type(e) for e in events] == [PeerWentOffline]


def test_a_peer_known_from_the_log_gets_a_grace_period_after_a_restart() -> None:
    state = replay(*online("a"), state=State(started_at=100.0))
    assert decide(state, 100.0 + TIMEOUT - 1, timing=TIMING) == []
    assert [type(e) for e in appended(decide(state, 100.0 + TIMEOUT + 1, timing=TIMING))] == [PeerWentOffline]


def test_training_peer_that_goes_silent_fails_its_run() -> None:
    state = running()
    beating(state, 10.0, "b", "c")
    events = appended(decide(state, 10.0, timing=TIMING))
    assert [type(e) for e in events] == [PeerWentOffline, PeerFailed]
    assert events[1].peer_id == "a" and events[1].session_id == "s1"  # type: ignore[union-attr]


def test_session_completes_with_the_best_peer_when_every_run_ended() -> None:
    state = replay(done("a", 0.8), state=running())
    assert summary(decide(state, 1.0, timing=TIMING)) == [("PeerReleased", "a", "s1")]
    state = replay(done("b", 0.9), state=state)
    [completed] = [e for e in appended(decide(state, 1.0, timing=TIMING)) if isinstance(e, SessionCompleted)]
    assert (completed.best_peer_id, completed.best_val_accuracy, completed.model_uri) == ("b", 0.9, "file:///b")


def test_session_with_a_failed_peer_completes_with_the_others() -> None:
    state = replay(PeerFailed(session_id="s1", peer_id="a", reason="boom"), done("b", 0.5), state=running())
    [completed] = [e for e in appended(decide(state, 1.0, timing=TIMING)) if isinstance(e, SessionCompleted)]
    assert completed.best_peer_id == "b"


def test_session_fails_when_every_peer_failed() -> None:
    state = replay(
        PeerFailed(session_id="s1", peer_id="a", reason="x"),
        PeerFailed(session_id="s1", peer_id="b", reason="y"),
        state=running(),
    )
    assert [type(e) for e in appended(decide(state, 1.0, timing=TIMING))] == [SessionFailed]


def test_ended_session_stops_and_releases_its_peers() -> None:
    state = replay(done("a", 0.8), SessionCancelled(session_id="s1"), state=running())
    actions = decide(state, 1.0, timing=TIMING)
    assert sorted(summary(actions)) == [("PeerReleased", "a", "s1"), ("PeerReleased", "b", "s1"), ("Stop", "b", "s1")]
    state = replay(*appended(actions), state=state)
    assert decide(state, 1.0, timing=TIMING) == []


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


def test_locks_of_a_session_that_never_started_are_released_at_start_up() -> None:
    state = replay(*online("a"), requested(n=2), PeerLocked(peer_id="a", session_id="s1"))
    assert [(e.peer_id, e.session_id) for e in appended(stale_locks(state))] == [("a", "s1")]  # type: ignore[union-attr]
