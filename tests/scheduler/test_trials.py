"""A search run by the scheduler's pure decisions, end to end: ``decide`` hands out trials as peers
free up, prunes at rungs, runs a killed peer's trial again (once counted), evaluates the finished
models, concludes with importances and completes. The shell is simulated: every appended fact is
folded back in, and each ``Train`` is answered with the heartbeats and ``PeerDone`` an honest peer
would report (a figure that peaks at lr = 1e-2 and rises with epochs)."""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec

from swarmtrain.common.events import (
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
    SearchConcluded,
    SessionCompleted,
    SessionStarted,
    Stop,
    Train,
    TrialPruned,
    TrialStarted,
)
from swarmtrain.common.search import SearchSpec
from swarmtrain.scheduler import trials
from swarmtrain.scheduler.actions import Append, AppendIf, Clocks, Config, Evaluate, Send, Timing
from swarmtrain.scheduler.decide import decide
from swarmtrain.scheduler.state import State, observe_presence
from tests.factories import session_requested
from tests.scheduler.helpers import replay

CONFIG = Config(uri=lambda key: f"file:///blobs/{key}", timing=Timing(peer_timeout=1e9, resend_after=1e9))
CLOCKS = Clocks(now=1.0, wall=1_700_000_000.0)
SHA = "a" * 64


def search(pruner: str = "none", trials_: int = 7, sampler: str = "random") -> SearchSpec:
    body = {
        "space": {"lr": {"log_uniform": [1e-4, 1e-1]}, "batch_size": {"choice": [16, 32]}},
        "trials": trials_,
        "sampler": sampler,
        "pruner": {"name": pruner, "min_epochs": 1, "reduction_factor": 2},
    }
    return msgspec.convert(body, SearchSpec)


def figure(lr: float, epoch: int) -> float:
    return 0.5 * (1 - math.exp(-epoch / 2)) + 0.45 * math.exp(-((math.log10(lr) + 2) ** 2))


def running(spec: SearchSpec, peers: tuple[str, ...] = ("a", "b", "c")) -> State:
    state = State()
    for p in peers:
        state = replay(state, PeerRegistered(peer_id=p, name=p, device="cpu"), PeerWentOnline(peer_id=p))
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu"), 0.0)
    request = session_requested(
        "s", len(peers), hyperparameters=Hyperparameters(epochs=4, batch_size=8, lr=0.01), search=spec
    )
    request = msgspec.structs.replace(request, hyperparameters=request.hyperparameters[:1])
    return replay(
        state,
        request,
        *(PeerLocked(peer_id=p, session_id="s") for p in peers),
        SessionStarted(session_id="s", assignments={}),
    )


def peer_reports(train: Train, kill: Callable[[Train], int | None]) -> list[Event]:
    """What an honest peer reports for ``train``; ``kill(train)``: the epoch it dies after, or None."""
    assert train.trial is not None
    out: list[Event] = []
    epochs = train.hyperparameters.epochs
    dies = kill(train)
    for epoch in range(1, epochs + 1):
        value = figure(train.hyperparameters.lr, epoch)
        out.append(
            Heartbeat(
                event_id=f"{train.event_id}.epoch{epoch}",
                session_id="s",
                peer_id=train.peer_id,
                trial=train.trial,
                epoch=epoch,
                epochs=epochs,
                loss=1 - value,
                accuracy=value,
                val_accuracy=value,
                samples_per_s=100.0,
            )
        )
        if dies == epoch:
            out.append(PeerFailed(session_id="s", peer_id=train.peer_id, trial=train.trial, reason="killed"))
            return out
    value = figure(train.hyperparameters.lr, epochs)
    out.append(
        PeerDone(
            event_id=f"{train.event_id}.done",
            session_id="s",
            peer_id=train.peer_id,
            trial=train.trial,
            model_uri=train.output_uri,
            model_sha256=SHA,
            epochs=epochs,
            loss=1 - value,
            accuracy=value,
            val_accuracy=value,
            train_seconds=float(epochs),
        )
    )
    return out


def run(state: State, kill: Callable[[Train], int | None] = lambda t: None, steps: int = 400) -> tuple[State, list]:
    """Decide and apply until the session completes; the peers report one epoch per decision, so
    trials overlap and the pruner judges them while others still run. Returns the state and every
    fact appended, in order."""
    appended: list[Event] = []
    pending: dict[str, list[Event]] = {}  # peer -> what it still has to report
    stopped: set[str] = set()
    for _ in range(steps):
        actions = decide(state, CLOCKS, CONFIG)
        new: list[Event] = []
        for action in actions:
            match action:
                case Append(event=event) | AppendIf(event=event):
                    if event.event_id not in {e.event_id for e in appended}:
                        new.append(event)
                case Send(command=Train() as train) if train.event_id not in stopped:
                    if train.peer_id not in pending or not pending[train.peer_id]:
                        stopped.add(train.event_id)
                        pending[train.peer_id] = peer_reports(train, kill)
                case Send(command=Stop(trial=trial) as stop) if trial is not None:
                    queue = pending.get(stop.peer_id, [])
                    if queue and getattr(queue[0], "trial", None) == trial:
                        pending[stop.peer_id] = []  # the job ends, reporting nothing more
                case Evaluate(peer_id=peer, trial=trial):
                    run_ = state.sessions["s"].runs[f"trial{trial}"]
                    new.append(
                        ModelEvaluated(
                            event_id=f"s.{peer}.trial{trial}.evaluated",
                            session_id="s",
                            peer_id=peer,
                            trial=trial,
                            val_accuracy=run_.val_accuracy,
                            model_sha256=SHA,
                        )
                    )
        for peer in sorted(pending):
            if pending[peer]:
                new.append(pending[peer].pop(0))
        appended += new
        state = replay(state, *new)
        if state.sessions["s"].status != "running":
            return state, appended
    raise AssertionError("the search did not end")


def started_trials(appended: list[Event]) -> list[TrialStarted]:
    return [e for e in appended if isinstance(e, TrialStarted)]


def test_a_search_of_more_trials_than_peers_runs_to_completion_and_says_what_mattered() -> None:
    state, appended = run(running(search(trials_=7)))
    session = state.sessions["s"]
    assert session.status == "completed"
    starts = started_trials(appended)
    assert sorted(s.trial for s in starts) == list(range(7))
    assert {s.peer_id for s in starts} == {"a", "b", "c"}  # three peers, seven trials
    concluded = next(e for e in appended if isinstance(e, SearchConcluded))
    completed = next(e for e in appended if isinstance(e, SessionCompleted))
    assert appended.index(concluded) < appended.index(completed)
    assert concluded.done == 7 and set(concluded.importances) == {"lr", "batch_size"}
    assert completed.best_trial == concluded.best_trial
    best_lr = next(s.params["lr"] for s in starts if s.trial == concluded.best_trial)
    assert concluded.best_params["lr"] == best_lr
    # the best trial is the one closest to lr = 1e-2 (the figure depends on lr alone)
    closest = min(starts, key=lambda s: abs(math.log10(float(s.params["lr"])) + 2))
    assert concluded.best_trial == closest.trial


def test_a_restarted_scheduler_suggests_the_same_next_trial() -> None:
    _, appended = run(running(search(trials_=6, sampler="tpe")))
    starts = started_trials(appended)
    # replay the log up to before trial 4 was handed out, with a cold cache: the same point
    cut = appended.index(next(s for s in starts if s.trial == 4))
    fresh = replay(running(search(trials_=6, sampler="tpe")), *appended[:cut])
    trials.forget("s")
    again = [
        a.event for a in decide(fresh, CLOCKS, CONFIG) if isinstance(a, AppendIf) and isinstance(a.event, TrialStarted)
    ]
    assert again and again[0].trial == 4 and again[0].params == starts[4].params


def test_asha_prunes_trials_at_a_rung_and_their_peer_takes_the_next_at_once() -> None:
    state, appended = run(running(search("asha", trials_=9)))
    pruned = [e for e in appended if isinstance(e, TrialPruned)]
    assert pruned, "asha stopped no trial"
    for p in pruned:
        assert p.rung in (1, 2) and "asha" in p.reason  # never at its last epoch: that trial is done
        beats = [e for e in appended if isinstance(e, Heartbeat) and e.trial == p.trial]
        assert max(b.epoch for b in beats) < 4  # stopped before its last epoch
        after = appended[appended.index(p) :]
        nxt = [s for s in after if isinstance(s, TrialStarted)]
        assert not nxt or any(s.peer_id == p.peer_id for s in nxt) or len(started_trials(appended)) == 9
    concluded = next(e for e in appended if isinstance(e, SearchConcluded))
    assert concluded.pruned == len(pruned) and concluded.done + concluded.pruned == 9
    assert state.sessions["s"].status == "completed"


def test_a_trial_at_its_last_epoch_is_never_pruned_its_result_is_kept() -> None:
    """TPE with asha over 9 and 16 trials reaches the rung at epoch 4, every trial's last: the
    trials judged there have done all their work, so they finish and count as done."""
    for n in (9, 16):
        _, appended = run(running(search("asha", trials_=n, sampler="tpe")))
        pruned = [e for e in appended if isinstance(e, TrialPruned)]
        assert pruned and all(p.rung < 4 for p in pruned), [p.rung for p in pruned]
        done = {e.trial for e in appended if isinstance(e, PeerDone)}
        assert done.isdisjoint(p.trial for p in pruned)
        concluded = next(e for e in appended if isinstance(e, SearchConcluded))
        assert (concluded.done, concluded.pruned) == (len(done), len(pruned)) and len(done) + len(pruned) == n


def test_a_peer_killed_mid_trial_has_its_trial_run_again_never_lost_never_counted_twice() -> None:
    killed: set[int] = set()

    def kill(train: Train) -> int | None:
        if train.trial == 2 and 2 not in killed:
            killed.add(2)
            return 2
        return None

    state, appended = run(running(search(trials_=5)), kill)
    attempts = [s for s in started_trials(appended) if s.trial == 2]
    assert [s.attempt for s in attempts] == [0, 1]
    assert attempts[1].params == attempts[0].params  # the same point, run again
    session = state.sessions["s"]
    assert session.status == "completed"
    assert session.runs["trial2"].status == "done"
    finished = [e for e in session.search_log if type(e).__name__ == "Finished"]
    assert sorted(e.trial for e in finished) == list(range(5))  # each trial once
    assert next(e for e in appended if isinstance(e, SearchConcluded)).done == 5


def decided(state: State) -> tuple[State, list[Event]]:
    """One decision, its appended facts folded back in (a shell that appends them all)."""
    new = [a.event for a in decide(state, CLOCKS, CONFIG) if isinstance(a, Append | AppendIf)]
    return replay(state, *new), new


def test_a_trial_whose_peer_dies_after_the_last_was_handed_out_runs_again_on_a_peer_that_waited() -> None:
    """Every trial handed out, the other peers done: the search keeps them (a trial still training
    may fail and need one); the dead peer's trial runs again on one of them, and the search ends."""
    state = running(search(trials_=2), peers=("a", "b"))
    starts: list[TrialStarted] = []
    while len(starts) < 2:
        state, new = decided(state)
        starts += [e for e in new if isinstance(e, TrialStarted)]
    on_a = next(s for s in starts if s.peer_id == "a")
    on_b = next(s for s in starts if s.peer_id == "b")
    done = PeerDone(
        session_id="s",
        peer_id="a",
        trial=on_a.trial,
        model_uri="file:///blobs/a",
        model_sha256=SHA,
        epochs=4,
        loss=0.5,
        accuracy=0.5,
        val_accuracy=0.5,
        train_seconds=4.0,
    )
    state, new = decided(replay(state, done))
    assert not [e for e in new if isinstance(e, PeerReleased)], "a peer left while a trial may still need it"
    assert state.peers["a"].session_id == "s"
    failed = PeerFailed(session_id="s", peer_id="b", trial=on_b.trial, reason="peer went offline")
    state, new = decided(replay(state, PeerWentOffline(peer_id="b"), failed))
    again = [e for e in new if isinstance(e, TrialStarted)]
    assert [(e.trial, e.attempt, e.peer_id) for e in again] == [(on_b.trial, 1, "a")]
    assert again[0].params == on_b.params


def test_a_search_whose_every_peer_went_offline_with_trials_left_fails_with_the_count() -> None:
    """Offline peers are released: a search holding none, with trials not finished, can never run
    them, so it fails and says how many were left instead of waiting for ever."""
    state = running(search(trials_=3), peers=("a",))
    state, new = decided(state)
    start = next(e for e in new if isinstance(e, TrialStarted))
    failed = PeerFailed(session_id="s", peer_id="a", trial=start.trial, reason="peer went offline")
    state = replay(state, PeerWentOffline(peer_id="a"), failed)
    for _ in range(3):  # the release, then the end
        state, new = decided(state)
        if state.sessions["s"].status != "running":
            break
    session = state.sessions["s"]
    assert session.status == "failed", session.status
    assert session.ended is not None and "3 of its 3 trials not finished" in session.ended.reason
    assert state.peers["a"].session_id is None
