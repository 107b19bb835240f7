"""A search's trials in the scheduler's decisions (``decide`` calls ``step`` for a running sweep
that carries a ``search``). Pure, as every decision: what it reads is the session's state, whose
``search_log`` is the search's log as the stream holds it, replayed through Optuna
(``scheduler.search.Replay``); what it returns is actions with ids derived from their cause.

- ``num_peers`` is the concurrency: the session's locked peers each run one trial at a time; a
  peer whose trial ended (done, pruned, failed) gets the next one in the very next decision.
- The next trial's point is ``Replay(log).suggest(n)``: a pure function of the seed and the log, so
  a restarted scheduler suggests the same. One new trial is handed out per decision (the next
  suggestion sees the previous one's ``TrialStarted``, read back from the log first); a trial whose
  run failed (its peer died) goes again, with its first point, before any new one.
- A trial is handed out with a compare-and-set on the session's subject (``TrialStarted``), and its
  ``Train`` goes only to the peer the log names, once the fact is read back.
- The pruner's decisions (one per rung figure the log holds) that stop a trial still training
  become ``TrialPruned`` and a ``Stop`` of that trial's job.
- Once every trial ended: the finished models are evaluated by the scheduler (the sweep's rule),
  then ``SearchConcluded`` (importances, the best trial by the scheduler's own figure), then the
  session completes (``decide._finish``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import msgspec

from swarmtrain.common.events import (
    Hyperparameters,
    SearchConcluded,
    SessionFailed,
    Train,
    TrialPruned,
    TrialStarted,
    bounded_text,
)
from swarmtrain.common.models import ModelSpec
from swarmtrain.common.search import Value, apply
from swarmtrain.scheduler import search
from swarmtrain.scheduler.actions import Action, AppendIf, Clocks, Config, Send, stop_trial, trial_train
from swarmtrain.scheduler.state import Peer, Run, Session, State, trial_key

_REPLAYS: dict[str, tuple[tuple[search.Entry, ...], search.Replay]] = {}
"""session_id -> (the entries applied, the replay): a cache, so a decision extends the study by
what is new instead of replaying the whole log; a log that is not an extension is replayed afresh."""
MAX_CACHED = 64


def replay_of(session: Session) -> search.Replay:
    """The session's search replayed from its log (cached, and equal to a fresh replay)."""
    spec = session.request.search
    assert spec is not None
    log = session.search_log
    cached = _REPLAYS.get(session.session_id)
    if cached is not None:
        applied, replay = cached
        same = replay.spec == spec and replay.seed == (session.request.seed if spec.seed is None else spec.seed)
        if same and len(applied) <= len(log) and log[: len(applied)] == applied:
            replay.extend(log)
            _REPLAYS[session.session_id] = (log, replay)
            return replay
    replay = search.Replay(spec, session.request.seed).extend(log)
    _REPLAYS[session.session_id] = (log, replay)
    while len(_REPLAYS) > MAX_CACHED:
        _REPLAYS.pop(next(iter(_REPLAYS)))
    return replay


def forget(session_id: str) -> None:
    _REPLAYS.pop(session_id, None)


def point_of(session: Session, point: Mapping[str, Value]) -> tuple[Hyperparameters, ModelSpec]:
    """The trial's hyperparameters and model: the session's own, with ``point`` applied."""
    return apply(point, session.request.hyperparameters[0], session.request.model)


def step(state: State, session: Session, locked: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
    """What to do now for a running search: prune, send the Trains the log names, hand out trials."""
    sid = session.session_id
    replay = replay_of(session)
    actions: list[Action] = []
    for decision in replay.decisions:
        if not decision.prune:
            continue
        run = session.runs.get(trial_key(decision.trial))
        if run is None or run.status != "training" or decision.epoch >= run.hyperparameters.epochs:
            continue  # a trial at its last epoch has done its work: its result is kept, not pruned
        figure = run.figures.get(decision.epoch)
        pruned = TrialPruned(
            event_id=f"{sid}.trial{decision.trial}.pruned",
            occurred_at=clocks.at,
            session_id=sid,
            trial=decision.trial,
            peer_id=run.peer_id,
            rung=decision.epoch,
            value=figure,
            reason=bounded_text(_reason(session, decision.epoch, figure)),
        )
        actions.append(AppendIf(pruned, expected=session.seq))
    for _, run in sorted(session.runs.items()):
        if run.trial is None:
            continue
        peer = state.peers.get(run.peer_id)
        if run.status == "training" and run.epoch == 0 and peer is not None and peer.online:
            actions.append(Send(train_of(session, run, clocks, config)))
        elif run.pruned:
            actions.append(Send(stop_trial(sid, run.peer_id, run.trial, run.attempt, clocks)))
    if any(isinstance(a, AppendIf) for a in actions):
        return actions  # the pruned trials' peers are free once the facts are read back
    free = [p for p in locked if p.online and session.training(p.peer_id) is None]
    if free:
        actions += _hand_out(session, replay, sorted(free, key=lambda p: p.peer_id), clocks)
    return actions


def _reason(session: Session, rung: int, figure: float | None) -> str:
    spec = session.request.search
    assert spec is not None
    metric, direction = spec.resolved()
    shown = "no figure" if figure is None else f"{metric} {figure:.4g}"
    return f"{spec.pruner.name} pruner at epoch {rung}: {shown} is not among the trials to go on ({direction})"


def _hand_out(session: Session, replay: search.Replay, free: Sequence[Peer], clocks: Clocks) -> list[Action]:
    """The next trial for the first free peer: a failed trial again, or else a new one."""
    spec = session.request.search
    assert spec is not None
    sid = session.session_id
    peer = free[0]
    reruns = session.reruns()
    if reruns:
        earlier = session.runs[trial_key(reruns[0])]
        trial, attempt, params = reruns[0], earlier.attempt + 1, dict(earlier.params)
        hyperparameters, model = earlier.hyperparameters, earlier.model or session.request.model
    else:
        trial = session.trials_started()
        if trial >= spec.trials:
            return []
        attempt, params = 0, replay.suggest(trial)
        try:
            hyperparameters, model = point_of(session, params)
        except msgspec.ValidationError:  # checked at the gateway; a value the bounds refuse fails alone
            hyperparameters, model = session.request.hyperparameters[0], session.request.model
    started = TrialStarted(
        event_id=f"{sid}.trial{trial}.started.{attempt}",
        occurred_at=clocks.at,
        session_id=sid,
        trial=trial,
        attempt=attempt,
        peer_id=peer.peer_id,
        params=params,
        hyperparameters=hyperparameters,
        model=model,
    )
    return [AppendIf(started, expected=session.seq)]


def train_of(session: Session, run: Run, clocks: Clocks, config: Config) -> Train:
    return trial_train(
        session.request, run.peer_id, run, clocks, config, session.max_model_bytes(run.model), session.init
    )


def done(session: Session) -> bool:
    """Whether every trial of the search ended (none training, none left to hand out)."""
    return not session.trials_left() and all(r.status != "training" for r in session.runs.values())


def stranded(session: Session, clocks: Clocks) -> SessionFailed:
    """The end of a running search that holds no peer any more (each went offline, and an offline
    peer's lock is released) while trials are left or still named training."""
    spec = session.request.search
    assert spec is not None
    left = spec.trials - sum(r.status == "done" or r.pruned for r in session.runs.values())
    return SessionFailed(
        event_id=f"{session.session_id}.failed",
        occurred_at=clocks.at,
        session_id=session.session_id,
        reason=f"every peer of the search went offline with {left} of its {spec.trials} trials not finished",
    )


def concluded(session: Session, best: str | None, clocks: Clocks) -> SearchConcluded:
    """What the finished search found: importances (PED-ANOVA over the finished trials, from a copy
    of the replayed study) and the best trial (``best``: the run key the scheduler's own
    evaluation ranks first)."""
    replay = copy.deepcopy(replay_of(session))
    try:
        importances = search.importances(replay)
    except (ValueError, RuntimeError):  # a space whose every finished trial has one value
        importances = {}
    run = session.runs.get(best) if best is not None else None
    checked = session.evaluations.get(best) if best is not None else None
    runs = [r for r in session.runs.values() if r.trial is not None]
    return SearchConcluded(
        event_id=f"{session.session_id}.search.concluded",
        occurred_at=clocks.at,
        session_id=session.session_id,
        importances={k: float(v) for k, v in importances.items()},
        best_trial=None if run is None else run.trial,
        best_params={} if run is None else dict(run.params),
        best_value=None if checked is None else checked.val_accuracy,
        done=sum(r.status == "done" for r in runs),
        pruned=sum(r.pruned for r in runs),
        failed=len(session.failed_trials),
    )
