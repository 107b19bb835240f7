"""What ``decide`` needs (clocks, timing, where blobs go) and what it returns (actions, with every
event and command in full). Every id here derives from what caused it, and every time from the
clocks passed in, so deciding twice on equal inputs gives equal actions, and a retried or repeated
decision is deduplicated by JetStream (``Nats-Msg-Id``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import msgspec

from swarmtrain.common import blobkeys, strategies
from swarmtrain.common.events import (
    MAX_CHECKPOINT_URLS,
    CheckpointSaved,
    Event,
    Hyperparameters,
    InitModelPrepared,
    ModelEvaluated,
    PeerFailed,
    PeerLocked,
    PeerReleased,
    RoundAveraged,
    RoundClosed,
    SessionEvent,
    SessionFact,
    SessionFailed,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    Stop,
    Train,
)
from swarmtrain.scheduler.placement import Rules
from swarmtrain.scheduler.state import MAX_MODEL_BYTES, Run, checkpoint_bytes

if TYPE_CHECKING:
    from swarmtrain.scheduler.lineage import Recompute


@dataclass(frozen=True)
class Clocks:
    now: float
    """Monotonic seconds: presence beats, which are not in the log."""
    wall: float
    """UTC seconds: round deadlines (against the broker's ``observed_at`` of events) and ``occurred_at``."""
    heard_since: float = 0.0
    """UTC seconds since which the scheduler has heard the platform without a gap (``State.heard_since``):
    a deadline never counts the time before it."""
    at_work: Mapping[str, float] = field(default_factory=dict)
    """peer_id -> monotonic time since which its beats have named, without a break, the ``Train`` of
    its run (``State.streak``; ``now`` while they do not): a peer that took up its work late
    (restarted, its ``Train`` sent again) is given a round's whole deadline from then, and one not
    at work on it is judged by the presence timeout and the re-sends, not by a round's deadline.
    A peer missing here is judged by the round's deadline alone."""

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.wall, UTC)


@dataclass(frozen=True)
class Timing:
    peer_timeout: float = 6.0
    """Silence after which a peer is offline."""
    first_round_timeout: float = 600.0
    """Rounds: a round's deadline while nothing is known about how long rounds take."""
    round_factor: float = 3.0
    """Rounds: deadline = this x the longest round (or first update) seen so far ..."""
    round_min: float = 10.0
    """... but never less than this many seconds."""
    resend_after: float = 10.0
    """A training run whose peer no presence beat shows working on its ``Train`` for this long gets
    the ``Train`` again, and again every as long after ..."""
    max_resends: int = 5
    """... at most this many times; then the run fails with the reason."""
    stale_lock: float = 30.0
    """A lock that no start or reassignment completed (its session is queued, gone, or has no run
    for the peer) is released once it is this old: the start that took it failed half-way."""


UriFor = Callable[[str], str]
"""Blob key -> the URI a peer reads or writes it at (the blob store's ``uri``)."""
Method = Literal["GET", "PUT"]
Signer = Callable[[Method, str, int | None], str]
"""``(method, key, max_bytes)`` -> an object-scoped, expiring URL (``signing.UrlSigner``); the
shell builds it, tests pass a pure one."""


@dataclass(frozen=True)
class Config:
    """What the scheduler's decisions depend on besides the state and the clocks."""

    uri: UriFor
    timing: Timing = Timing()
    signer: Signer | None = None
    """None: commands carry no signed URLs (a store the peers reach themselves)."""
    rules: Rules = field(default_factory=Rules)
    """Placement: which models are large (GPU peers first), how much memory training one takes."""

    def key_of(self, uri: str) -> str | None:
        """The key of an object URI of this store, or None for a URI outside it."""
        prefix = self.uri("k")[:-1]
        return uri[len(prefix) :] if uri.startswith(prefix) and len(uri) > len(prefix) else None

    def sign(self, method: Method, uri: str, max_bytes: int | None = None) -> str:
        """A signed URL of ``uri``, or "" without a signer or for a URI outside the store."""
        key = self.key_of(uri)
        if self.signer is None or key is None:
            return ""
        return self.signer(method, key, max_bytes if method == "PUT" else None)


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Append:
    event: Event


@dataclass(frozen=True)
class AppendIf:
    """Append ``event`` if its subject is still at ``expected`` (a compare-and-set); skipped otherwise."""

    event: Event
    expected: int


@dataclass(frozen=True)
class Send:
    command: Train | Stop | SessionFact
    msg_id: str | None = None
    """The ``Nats-Msg-Id`` to publish with, when not the command's own ``event_id``: a re-send of
    a ``Train`` is the same command (same ``event_id``, so the peer knows it) under a fresh id (so
    JetStream stores it again)."""

    @property
    def id(self) -> str:
        return self.msg_id or self.command.event_id


@dataclass(frozen=True)
class Forward:
    """Send ``fact`` to ``peer_id`` as a ``SessionFact`` (``session_fact``), with its signed URLs:
    the shell builds and signs it only when it has not sent that id yet."""

    peer_id: str
    fact: SessionEvent
    again: int = 0
    """Sent again with the ``again``-th re-send of the run's ``Train`` (a new id: a restarted peer
    knows nothing it was sent before)."""

    @property
    def id(self) -> str:
        return forward_id(self.fact, self.peer_id) + (f".again.{self.again}" if self.again else "")


@dataclass(frozen=True)
class Evaluate:
    """Re-evaluate ``peer_id``'s finished model on the session's validation split and append the
    ``ModelEvaluated`` (``evaluated``) the shell measures: a sweep's winner is checked, not believed."""

    session_id: str
    peer_id: str
    model_uri: str
    sha256: str
    trial: int | None = None
    """A search: the trial whose model it is."""


@dataclass(frozen=True)
class Prepare:
    """Recompute a fork's starting model (``lineage.Recompute``) in a worker thread, store it under
    the new session's prefix and append its ``InitModelPrepared`` (``init_prepared``)."""

    recompute: Recompute


@dataclass(frozen=True)
class Lock:
    """Append ``event`` if the peer's subject is still at ``expected``."""

    event: PeerLocked
    expected: int


@dataclass(frozen=True)
class Start:
    """Lock every peer (compare-and-set each), then append ``started`` if the session's subject is
    still at ``expected``, then send the ``trains``. Any failed compare-and-set releases what this
    attempt locked; the next decision retries."""

    session_id: str
    locks: tuple[Lock, ...]
    started: SessionStarted
    expected: int
    trains: tuple[Train, ...]

    @property
    def peer_ids(self) -> tuple[str, ...]:
        return tuple(lock.event.peer_id for lock in self.locks)


@dataclass(frozen=True)
class Reassign:
    """Take over a failed participant's shard: ``lock`` (compare-and-set), append ``moved``, send ``train``."""

    lock: Lock
    moved: ShardReassigned
    train: Train

    @property
    def session_id(self) -> str:
        return self.moved.session_id

    @property
    def peer_id(self) -> str:
        return self.moved.to_peer_id


Action = Append | AppendIf | Send | Forward | Evaluate | Prepare | Start | Reassign


# ------------------------------------------------------------------ events and commands


def digest(*parts: object) -> str:
    """A short stable id part for a decision made of several inputs."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


def lock(session_id: str, peer_id: str, expected: int, cause: str, clocks: Clocks) -> Lock:
    """``cause`` names the whole decision, so two schedulers that decide differently never share an id."""
    event = PeerLocked(
        event_id=f"{session_id}.{peer_id}.locked.{cause}", occurred_at=clocks.at, peer_id=peer_id, session_id=session_id
    )
    return Lock(event=event, expected=expected)


def release(session_id: str, peer_id: str, lock_seq: int, clocks: Clocks) -> PeerReleased:
    """Free the lock appended at stream sequence ``lock_seq``."""
    return PeerReleased(
        event_id=f"{session_id}.{peer_id}.released.{lock_seq}",
        occurred_at=clocks.at,
        peer_id=peer_id,
        session_id=session_id,
    )


def stop(session_id: str, peer_id: str, lock_seq: int, clocks: Clocks) -> Stop:
    return Stop(
        event_id=f"{session_id}.{peer_id}.stop.{lock_seq}",
        occurred_at=clocks.at,
        peer_id=peer_id,
        session_id=session_id,
    )


def peer_failed(
    session_id: str, peer_id: str, reason: str, clocks: Clocks, trial: tuple[int, int] | None = None
) -> Append:
    """A run's failure: one per run (a peer has at most one run a session, but for a search's,
    one per trial and attempt: ``trial``)."""
    event = PeerFailed(
        event_id=f"{session_id}.{peer_id}.failed"
        if trial is None
        else f"{trial_train_id(session_id, peer_id, *trial)}.failed",
        occurred_at=clocks.at,
        session_id=session_id,
        peer_id=peer_id,
        reason=reason,
        trial=None if trial is None else trial[0],
    )
    return Append(event)


def trial_train_id(session_id: str, peer_id: str, trial: int, attempt: int) -> str:
    """The id of the ``Train`` of a search's trial (one per attempt); its reports' ids extend it."""
    return f"{train_prefix(session_id, peer_id)}trial{trial}.{attempt}"


def stop_trial(session_id: str, peer_id: str, trial: int, attempt: int, clocks: Clocks) -> Stop:
    """Stop a pruned trial's job (only that trial's: the peer takes the next one at once)."""
    return Stop(
        event_id=f"{session_id}.{peer_id}.stop.trial{trial}-{attempt}",
        occurred_at=clocks.at,
        peer_id=peer_id,
        session_id=session_id,
        trial=trial,
    )


def session_failed(session_id: str, reason: str, clocks: Clocks) -> Append:
    return Append(
        SessionFailed(event_id=f"{session_id}.failed", occurred_at=clocks.at, session_id=session_id, reason=reason)
    )


def train_id(session_id: str, peer_id: str, start_round: int) -> str:
    """The id of the ``Train`` that starts ``peer_id``'s run at ``start_round``: what its presence
    beats name while it works on it."""
    return f"{train_prefix(session_id, peer_id)}{start_round}"


def train_prefix(session_id: str, peer_id: str) -> str:
    """What the id of every ``Train`` of ``peer_id``'s run in ``session_id`` starts with."""
    return f"{session_id}.{peer_id}.train."


def resend_id(train: Train, n: int) -> str:
    """The ``Nats-Msg-Id`` of the ``n``-th re-send of ``train``."""
    return f"{train.event_id}.resend.{n}"


def forward_id(fact: SessionEvent, peer_id: str) -> str:
    return f"{fact.event_id}.to.{peer_id}"


def train_command(
    req: SessionRequested,
    peer_id: str,
    hyperparameters: Hyperparameters,
    shard: int,
    start_round: int,
    clocks: Clocks,
    config: Config | UriFor,
    max_model_bytes: int = MAX_MODEL_BYTES,
    init: tuple[str, str] | None = None,
    resume: CheckpointSaved | None = None,
) -> Train:
    """The ``Train`` of ``peer_id``'s run from ``start_round``, with the signed URLs of what it reads
    and writes (``config``'s signer; a bare ``UriFor`` signs nothing); ``init``: the session's
    starting model ``(uri, sha256)``, None for seeded weights; ``resume``: a sweep run's last
    checkpoint, which it goes on from (its next checkpoints' URLs signed from there)."""
    config = config if isinstance(config, Config) else Config(uri=config)
    uri = config.uri
    sid = req.session_id
    output_uri = uri(blobkeys.model(sid, peer_id))
    rounds_uri = uri(blobkeys.rounds(sid))
    rounds = range(start_round, req.rounds + 1) if strategies.rules(req.strategy).rounds else range(0)
    update_urls = {r: config.sign("PUT", blobkeys.update_uri(rounds_uri, r, peer_id), max_model_bytes) for r in rounds}
    average_urls = {r: config.sign("PUT", blobkeys.average_uri(rounds_uri, r), max_model_bytes) for r in rounds}
    every = 0 if strategies.rules(req.strategy).rounds else hyperparameters.checkpoint_every
    checkpoints_uri = uri(blobkeys.checkpoints(sid, peer_id)) if every else ""
    after = resume.epoch if resume is not None else 0
    epochs = range(after - after % every + every, hyperparameters.epochs, every) if every else range(0)
    checkpoint_urls = {
        e: config.sign("PUT", blobkeys.checkpoint_uri(checkpoints_uri, e), checkpoint_bytes(max_model_bytes))
        for e in epochs[:MAX_CHECKPOINT_URLS]
    }
    return Train(
        event_id=train_id(sid, peer_id, start_round),
        occurred_at=clocks.at,
        peer_id=peer_id,
        session_id=sid,
        dataset_uri=req.dataset_uri,
        dataset_sha256=req.dataset_sha256,
        label_column=req.label_column,
        model=req.model,
        hyperparameters=hyperparameters,
        validation_split=req.validation_split,
        seed=req.seed,
        output_uri=output_uri,
        strategy=req.strategy,
        shard=shard,
        num_shards=req.num_peers,
        rounds=req.rounds,
        start_round=start_round,
        rounds_uri=rounds_uri,
        dataset_url=config.sign("GET", req.dataset_uri),
        output_url=config.sign("PUT", output_uri, max_model_bytes),
        update_urls={r: u for r, u in update_urls.items() if u},
        average_urls={r: u for r, u in average_urls.items() if u},
        round_options=req.round_options,
        init_uri=init[0] if init else "",
        init_url=config.sign("GET", init[0]) if init else "",
        init_sha256=init[1] if init else "",
        precision=req.precision,
        data=req.data,
        data_read=req.data_read,
        validation_uri=req.validation.uri if req.validation else "",
        validation_url=config.sign("GET", req.validation.uri) if req.validation else "",
        validation_sha256=req.validation.sha256 if req.validation else "",
        checkpoints_uri=checkpoints_uri,
        checkpoint_urls={e: u for e, u in checkpoint_urls.items() if u},
        resume_epoch=resume.epoch if resume is not None else 0,
        resume_uri=resume.uri if resume is not None else "",
        resume_url=config.sign("GET", resume.uri) if resume is not None else "",
        resume_sha256=resume.sha256 if resume is not None else "",
    )


def trial_train(
    req: SessionRequested,
    peer_id: str,
    run: Run,
    clocks: Clocks,
    config: Config,
    max_model_bytes: int = MAX_MODEL_BYTES,
    init: tuple[str, str] | None = None,
) -> Train:
    """The ``Train`` of a search's run: the trial's hyperparameters and model, its own output URI
    (``blobkeys.trial_model``), its trial named, so that its reports name it too."""
    assert run.trial is not None
    config = config if isinstance(config, Config) else Config(uri=config)
    base = train_command(req, peer_id, run.hyperparameters, 0, 1, clocks, config, max_model_bytes, init)
    output_uri = config.uri(blobkeys.trial_model(req.session_id, run.trial, peer_id))
    return msgspec.structs.replace(
        base,
        event_id=trial_train_id(req.session_id, peer_id, run.trial, run.attempt),
        model=run.model or req.model,
        output_uri=output_uri,
        output_url=config.sign("PUT", output_uri, max_model_bytes),
        trial=run.trial,
        checkpoints_uri="",  # a trial does not checkpoint (yet): a re-run starts at epoch 1
        checkpoint_urls={},
    )


def session_fact(forward: Forward, clocks: Clocks, config: Config) -> SessionFact:
    """The ``SessionFact`` a ``Forward`` sends: the fact, and a signed GET of every object it names."""
    fact = forward.fact
    named: list[str] = []
    match fact:
        case RoundClosed():
            named = [u.uri for u in fact.updates]
        case RoundAveraged():
            named = [fact.uri]
    urls = {u: url for u in named if (url := config.sign("GET", u))}
    return SessionFact(
        event_id=forward.id,
        occurred_at=clocks.at,
        peer_id=forward.peer_id,
        session_id=fact.session_id,
        fact=fact,
        urls=urls,
    )


def init_prepared(
    recompute: Recompute, uri: str, sha256: str, included: Sequence[str], clocks: Clocks
) -> InitModelPrepared:
    """The fact of a fork's recomputed starting model: one per session."""
    closed = recompute.closed
    return InitModelPrepared(
        event_id=f"{recompute.session_id}.init.prepared",
        occurred_at=clocks.at,
        session_id=recompute.session_id,
        parent_session_id=closed.session_id,
        round=closed.round,
        excluded=list(recompute.excluded),
        included=list(included),
        uri=uri,
        sha256=sha256,
    )


def evaluated(
    action: Evaluate, val_loss: float | None, val_accuracy: float | None, reason: str | None, clocks: Clocks
) -> ModelEvaluated:
    """The fact of one evaluation: one per finished run (a model is evaluated once)."""
    trial = "" if action.trial is None else f".trial{action.trial}"
    return ModelEvaluated(
        event_id=f"{action.session_id}.{action.peer_id}{trial}.evaluated",
        trial=action.trial,
        occurred_at=clocks.at,
        session_id=action.session_id,
        peer_id=action.peer_id,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        model_sha256=action.sha256,
        reason=reason,
    )
