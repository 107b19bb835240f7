"""Reports -> facts: what a peer says is checked against what the scheduler knows before it is
appended to the log (issue 10). Pure: ``check`` reads the state and returns either the report
itself (appended as is, same ``event_id``, as the fact) or the ``ReportRejected`` to append.

Who speaks is the peer id in the report's SUBJECT (``peer.<id>.reports``: NATS lets only that peer
publish there), never the body's: a body naming another peer is refused. Then, per report:

- ``PeerRegistered``: the sender's own registration, names of bounded length.
- every session report: a ``running`` session in which the sender holds a ``training`` run.
- ``Heartbeat``: its epoch within the run's epochs, figures finite and in range; of a run that is
  ``done`` too, for an epoch it trained before (a report redelivered late, after its ``PeerDone``).
- ``ModelUpdatePublished``: the open round, once per round, at exactly the URI the ``Train``
  handed (``<rounds_uri>/<round>/<peer>.safetensors``), ``num_samples`` exactly the shard's
  training rows (``shapes`` from the dataset's rows, the split and the shard).
- ``PeerDone``: at exactly the handed ``output_uri``; a fedavg run only once its last round closed.
- ``UpdateRejected``: a closed round's update that the round named; ``RoundAveraged``: a closed
  round, at exactly ``<rounds_uri>/<round>/average.safetensors``.
- ``PeerFailed``: a reason of bounded length (a diverged run reports its reason this way).
- ``CheckpointSaved``: a sweep's run with ``checkpoint_every`` (no trial, no rounds), an epoch it
  checkpoints at (a multiple, never the last), later than its last checkpoint, at exactly
  ``<checkpoints_uri>/<epoch>.safetensors``, at most ``max_checkpoint_bytes``.

A report's ``event_id`` becomes the fact's, so it must not take an id the services decide with:
a session report's id starts with its session's id and is none of the scheduler's shapes (see
``reserved``), or a peer could pre-empt, say, ``<session>.completed`` and JetStream would drop the
real one as a duplicate.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

from swarmtrain.common import blobkeys, strategies, tasks
from swarmtrain.common.events import (
    CLASSIFICATION,
    MAX_REPORTED_REASON,
    CheckpointSaved,
    Heartbeat,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerRegistered,
    Report,
    ReportRejected,
    RoundAveraged,
    UpdateRejected,
)
from swarmtrain.common.fedopts import possible_rules
from swarmtrain.scheduler.actions import Config, digest, trial_train_id
from swarmtrain.scheduler.state import Run, Session, State

MAX_ID_CHARS = 200
MAX_NAME_CHARS = 200
MAX_SECONDS = 10 * 365 * 24 * 3600.0
MAX_LOSS = 1e12
MAX_RATE = 1e12
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RESERVED = re.compile(
    r"\.(started|locked|released|reassigned|online|offline|resend|to)\.[^.]*$"
    r"|\.(completed|failed|cancelled|closed|evaluated|requested|pruned|concluded)$"
    r"|\.report\.[0-9a-f]+\.rejected$"
)
"""The shapes of the ids the services give their own decisions (``actions``, ``decide``)."""


class Refused(Exception):
    """Why a report does not become a fact."""


def reserved(event_id: str, allowed: str | None = None) -> bool:
    """Whether ``event_id`` has the shape of an id a service decides with (``allowed`` excepted)."""
    return event_id != allowed and _RESERVED.search(event_id) is not None


def rejected_id(sender: str, report_id: str) -> str:
    """The id of the rejection of ``sender``'s report ``report_id``: one per report."""
    return f"{sender}.report.{digest(report_id)}.rejected"


def check(
    state: State, sender: str, report: Report, config: Config, at: datetime | None = None
) -> Report | ReportRejected:
    """``report`` itself when ``sender`` (the peer id of the subject it came on) may say it and
    it agrees with what the scheduler knows; the ``ReportRejected`` (at ``at``, default the
    report's own time) that says why not otherwise."""
    try:
        _check(state, sender, report, config)
    except Refused as why:
        return ReportRejected(
            event_id=rejected_id(sender, report.event_id),
            occurred_at=report.occurred_at if at is None else at,
            peer_id=sender,
            session_id=_session_id(report),
            report_type=type(report).__name__,
            report_id=report.event_id[:MAX_ID_CHARS],
            reason=str(why),
        )
    return report


def _session_id(report: Report) -> str | None:
    session_id = getattr(report, "session_id", None)
    return session_id[:MAX_ID_CHARS] if isinstance(session_id, str) else None


def _check(state: State, sender: str, report: Report, config: Config) -> None:
    speaker = report.reported_by if isinstance(report, UpdateRejected) else report.peer_id
    if speaker != sender:
        raise Refused(f"sent by peer {sender!r} in the name of {speaker[:MAX_ID_CHARS]!r}")
    _text("event_id", report.event_id, MAX_ID_CHARS)
    if isinstance(report, PeerRegistered):
        if reserved(report.event_id):
            raise Refused(f"event_id {report.event_id!r} has the shape of an id the services decide with")
        _text("name", report.name, MAX_NAME_CHARS)
        _text("device", report.device, MAX_NAME_CHARS)
        return
    sid = report.session_id
    own_failure = f"{sid}.{sender}.failed" if isinstance(report, PeerFailed) else None
    held = state.sessions.get(sid)
    mine = held.training(sender) if held is not None else None
    if own_failure is not None and mine is not None and mine.trial is not None:
        own_failure = f"{trial_train_id(sid, sender, mine.trial, mine.attempt)}.failed"
    if not report.event_id.startswith(f"{sid}.") or reserved(report.event_id, own_failure):
        raise Refused(f"event_id {report.event_id!r} is not one a peer may give a report of session {sid!r}")
    session = state.sessions.get(sid)
    if session is None or session.status != "running":
        raise Refused(f"session {sid[:MAX_ID_CHARS]!r} is not running")
    run = session.training(sender)
    if run is None and isinstance(report, Heartbeat):
        run = _finished_run(session, sender, report)
    if run is None:
        raise Refused(f"peer {sender!r} holds no training run in session {sid!r}")
    trial = getattr(report, "trial", None)
    if (
        isinstance(report, Heartbeat | PeerDone | PeerFailed)
        and trial != run.trial
        and not (isinstance(report, PeerFailed) and trial is None)
    ):
        raise Refused(f"trial {trial}: peer {sender!r} holds trial {run.trial} of session {sid!r}")
    match report:
        case Heartbeat():
            total = _epochs(session, run)
            if report.epochs != total or not 1 <= report.epoch <= total:
                raise Refused(f"epoch {report.epoch} of {report.epochs}: this run trains {total} epochs")
            _figures(report.loss, report.accuracy, report.val_loss, report.val_accuracy, session.request.data.task)
            _bounded("samples_per_s", report.samples_per_s, 0.0, MAX_RATE)
            allowed = tasks.rules(session.request.data.task).figures
            if unknown := sorted(set(report.figures) - set(allowed)):
                raise Refused(f"figures {unknown[:5]} are not the task's: {', '.join(allowed) or 'none'}")
        case ModelUpdatePublished():
            _update(session, run, sender, report, config)
        case PeerDone():
            expected = config.uri(
                blobkeys.model(sid, sender) if run.trial is None else blobkeys.trial_model(sid, run.trial, sender)
            )
            if report.model_uri != expected:
                raise Refused(f"model_uri {report.model_uri[:300]!r} is not the output_uri it was handed")
            _sha256(report.model_sha256)
            total = _epochs(session, run)
            if not 1 <= report.epochs <= total:
                raise Refused(f"{report.epochs} epochs: this run trains {total}")
            if strategies.rules(session.request.strategy).rounds and session.rounds_open:
                raise Refused(f"round {session.round} of {session.request.rounds} is still open")
            _figures(report.loss, report.accuracy, report.val_loss, report.val_accuracy, session.request.data.task)
            _bounded("train_seconds", report.train_seconds, 0.0, MAX_SECONDS)
        case PeerFailed():
            _text("reason", report.reason, MAX_REPORTED_REASON)
        case CheckpointSaved():
            _checkpoint(session, run, sender, report, config)
        case UpdateRejected():
            closed = session.closed.get(report.round)
            if closed is None:
                raise Refused(f"round {report.round} is not closed")
            if report.peer_id not in {u.peer_id for u in closed.updates}:
                raise Refused(f"round {report.round} has no update of {report.peer_id[:MAX_ID_CHARS]!r}")
            _text("reason", report.reason, MAX_REPORTED_REASON)
        case RoundAveraged():
            if report.round not in session.closed:
                raise Refused(f"round {report.round} is not closed")
            expected = blobkeys.average_uri(config.uri(blobkeys.rounds(sid)), report.round)
            if report.uri != expected:
                raise Refused(f"uri {report.uri[:300]!r} is not the round's average URI it was handed")
            _sha256(report.sha256)
            _figures(0.0, 0.0, report.val_loss, report.val_accuracy, session.request.data.task)
            rules = possible_rules(session.request.round_options.aggregator)
            if report.aggregator not in rules:
                raise Refused(f"aggregator {report.aggregator[:MAX_NAME_CHARS]!r} is not one of {sorted(rules)}")
            named = {u.peer_id for u in session.closed[report.round].updates}
            if not set(report.selected) <= named:
                raise Refused(f"selected names peers round {report.round} has no update of")


def _update(session: Session, run: Run, sender: str, report: ModelUpdatePublished, config: Config) -> None:
    sid = session.session_id
    if not session.rounds_open or report.round != session.round:
        raise Refused(f"round {report.round} is not open (the open round is {session.round or 'none'})")
    if sender in session.updates:
        raise Refused(f"already published its update of round {report.round}")
    expected = blobkeys.update_uri(config.uri(blobkeys.rounds(sid)), report.round, sender)
    if report.uri != expected:
        raise Refused(f"uri {report.uri[:300]!r} is not the update URI it was handed ({expected})")
    _sha256(report.sha256)
    rows = session.training_rows(run.shard)
    if rows is None:
        raise Refused("the dataset's size is unknown: no sample count can be checked")
    if report.num_samples != rows:
        raise Refused(f"num_samples {report.num_samples}: shard {run.shard} holds {rows} training rows")
    if report.nbytes > session.max_model_bytes():
        raise Refused(f"nbytes {report.nbytes}: an update of this model holds at most {session.max_model_bytes()}")
    _figures(report.loss, report.accuracy, None, None, session.request.data.task)


def _checkpoint(session: Session, run: Run, sender: str, report: CheckpointSaved, config: Config) -> None:
    """A sweep run's checkpoint: one its ``Train`` could write (``checkpoint_every``, not the last
    epoch), at exactly the handed URI, after the run's last one, of a size its model can have."""
    sid, every, total = session.session_id, run.hyperparameters.checkpoint_every, _epochs(session, run)
    if strategies.rules(session.request.strategy).rounds or run.trial is not None or report.trial is not None:
        raise Refused("only a sweep's run checkpoints (a fedavg run resumes from its rounds)")
    if every == 0 or report.epoch % every or not 1 <= report.epoch < total:
        raise Refused(f"epoch {report.epoch}: this run checkpoints every {every} epochs of {total}, not the last")
    if run.checkpoint is not None and report.epoch <= run.checkpoint.epoch:
        raise Refused(f"epoch {report.epoch}: the run's last checkpoint is of epoch {run.checkpoint.epoch}")
    expected = blobkeys.checkpoint_uri(config.uri(blobkeys.checkpoints(sid, sender)), report.epoch)
    if report.uri != expected:
        raise Refused(f"uri {report.uri[:300]!r} is not the checkpoint URI it was handed ({expected})")
    _sha256(report.sha256)
    if not 0 < report.nbytes <= session.max_checkpoint_bytes():
        raise Refused(
            f"nbytes {report.nbytes}: a checkpoint of this model holds at most {session.max_checkpoint_bytes()}"
        )


def _finished_run(session: Session, sender: str, beat: Heartbeat) -> Run | None:
    """The sender's finished run, for a heartbeat of an epoch it trained before it finished (a report
    redelivered late: its first delivery's scheduler died before it acked); None otherwise."""
    run = session.run_of(sender)
    done = run is not None and run.status == "done" and beat.epoch <= run.epoch and run.trial == beat.trial
    return run if done else None


def _epochs(session: Session, run: Run) -> int:
    rounds = session.request.rounds if strategies.rules(session.request.strategy).rounds else 1
    return run.hyperparameters.epochs * rounds


def _text(name: str, value: str, limit: int) -> None:
    if not value or len(value) > limit or any(ord(c) < 32 and c not in "\t\n" for c in value):
        raise Refused(f"{name} must be 1 to {limit} printable characters")


def _sha256(value: str) -> None:
    if not _SHA256.fullmatch(value):
        raise Refused("sha256 must be 64 lowercase hex digits")


def _bounded(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise Refused(f"{name} {value!r} is not a finite number in [{low:g}, {high:g}]")


def _figures(
    loss: float, accuracy: float, val_loss: float | None, val_accuracy: float | None, task: str = CLASSIFICATION
) -> None:
    """The figures' bounds: a loss is at least 0, a score (``accuracy``) within the task's bounds
    (``common.tasks``: accuracy in [0, 1], a regression's R² at most 1)."""
    low, high = tasks.rules(task).score_low, tasks.rules(task).score_high
    _bounded("loss", loss, 0.0, MAX_LOSS)
    _bounded("accuracy", accuracy, low, high)
    if val_loss is not None:
        _bounded("val_loss", val_loss, 0.0, MAX_LOSS)
    if val_accuracy is not None:
        _bounded("val_accuracy", val_accuracy, low, high)
