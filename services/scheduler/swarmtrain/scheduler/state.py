"""The scheduler's state and its fold: ``evolve`` (one event) and ``fold`` (a batch) return a new
``State`` and never change the one they are given.

No I/O here. The shell (service.py) folds every event of the EVENTS stream in with its stream
sequence and the time the broker stored it (``observed_at``, UTC seconds: a peer's own clock,
the ``occurred_at`` of its events, never times a round), and presence beats with
``observe_presence``/``observe_beats``. ``decide.py`` reads the state and says what to do.

The state is a tree of frozen dataclasses behind read-only mappings: a changed peer or session is
a new object (``dataclasses.replace``) in a new mapping; untouched ones are shared, so a fold costs
what it changes plus one shallow copy of a mapping per batch, never a deep copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from swarmtrain.common import models, shapes, strategies
from swarmtrain.common.events import (
    TERMINAL_SESSION_EVENTS,
    CheckpointSaved,
    DatasetUploaded,
    Event,
    Heartbeat,
    Hyperparameters,
    InitModelPrepared,
    ModelEvaluated,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOffline,
    PeerWentOnline,
    Presence,
    ReportRejected,
    RoundAveraged,
    RoundClosed,
    RoundUpdate,
    SearchConcluded,
    SessionEvent,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    TrialPruned,
    TrialStarted,
    UpdateRejected,
)
from swarmtrain.common.lifecycle import ends_session, run_after, session_after, starts_session, takes_new_runs
from swarmtrain.common.models import ModelSpec
from swarmtrain.common.specs import PeerSpecs
from swarmtrain.common.status import RunStatus, SessionStatus
from swarmtrain.scheduler.search import Entry, Finished, Reported, Suggested

MAX_MODEL_BYTES = 1 << 30
"""The PUT bound of a model or update file when the dataset's shape is unknown."""


def checkpoint_bytes(max_model_bytes: int) -> int:
    """The PUT bound of a checkpoint of a model of at most ``max_model_bytes``: the model's and up
    to two optimizer moments (AdamW's), and room for the step counts, generators and header."""
    return 3 * max_model_bytes + (1 << 20)


MAX_ATTEMPTS = 3
"""A search's trial whose run failed is run again (on whichever peer is free), this many runs at
most; then it counts as failed (once)."""


def trial_key(trial: int) -> str:
    """A search's run key: its runs are keyed by trial, a peer running several in turn."""
    return f"trial{trial}"


@dataclass(frozen=True)
class Peer:
    peer_id: str
    name: str = ""
    device: str = ""
    online: bool = False
    session_id: str | None = None
    seq: int = 0
    """Stream sequence of the last event on ``peer.<id>.events``: the lock's compare-and-set."""
    lock_seq: int = 0
    """Stream sequence of the peer's latest ``PeerLocked``: what the ids of its release and stop derive from."""
    locked_at: float = 0.0
    """Observed time of the peer's latest ``PeerLocked``: a lock no start completed is stale after a while."""
    specs: PeerSpecs | None = None
    """What it has, from its latest ``PeerRegistered`` (None: a peer older than specs)."""


@dataclass(frozen=True)
class Dataset:
    """What the scheduler knows of an uploaded dataset (``DatasetUploaded``): enough to compute each
    shard's training rows and to bound a model file's size."""

    rows: int
    features: int
    classes: int
    shape: tuple[int, ...] = ()
    """One row's shape as the upload recorded it (``[C, H, W]`` for images)."""


@dataclass(frozen=True)
class Run:
    """One peer's part in a session."""

    hyperparameters: Hyperparameters
    status: RunStatus = "training"
    epoch: int = 0
    val_accuracy: float | None = None
    model_uri: str | None = None
    model_sha256: str | None = None
    shard: int = 0
    start_round: int = 1
    """The round its ``Train`` starts at (a reassignment's round): names the ``Train`` (``train_id``)."""
    since: float = 0.0
    """Observed time the run began (its session's start or its reassignment)."""
    peer_id: str = ""
    """A search's run: the peer running it ("" : the run's key is its peer)."""
    trial: int | None = None
    """A search's run: its trial (the run's key is ``trial_key(trial)``)."""
    attempt: int = 0
    params: Mapping[str, float | int | str] = field(default_factory=dict)
    model: ModelSpec | None = None
    """A search's run: the trial's model (the session's with the point applied)."""
    pruned: bool = False
    figures: Mapping[int, float] = field(default_factory=dict)
    """A search's run: epoch -> the search's metric as its heartbeats reported it (first one stands)."""
    checkpoint: CheckpointSaved | None = None
    """A sweep's run: its last checkpoint (``checkpoint_every``), which a re-sent ``Train`` resumes from."""

    def peer(self, key: str) -> str:
        """The peer of the run stored under ``key``."""
        return self.peer_id or key


@dataclass(frozen=True)
class Session:
    request: SessionRequested
    status: SessionStatus = "queued"
    seq: int = 0
    """Stream sequence of the last event on ``session.<id>.events``: the start's compare-and-set."""
    order: int = 0
    """Stream sequence of its ``SessionRequested``: its place in the queue within its priority."""
    runs: Mapping[str, Run] = field(default_factory=dict)
    # rounds (strategies whose ``rounds`` is true)
    round: int = 0
    """The open round (1-based); ``rounds + 1`` once the last one closed; 0 for a strategy without rounds."""
    round_opened: float = 0.0
    """Observed time the open round opened."""
    round_base: float = 0.0
    """Observed time the open round's deadline counts from: its opening, or its latest reassignment."""
    first_update: float | None = None
    """Observed time of the open round's first update."""
    longest_round: float = 0.0
    updates: Mapping[str, RoundUpdate] = field(default_factory=dict)
    """The open round's updates by peer."""
    dataset: Dataset | None = None
    """The requested dataset's shape, when its ``DatasetUploaded`` is in the log."""
    closed: Mapping[int, RoundClosed] = field(default_factory=dict)
    """Every closed round's ``RoundClosed``."""
    facts: tuple[SessionEvent, ...] = ()
    """The facts the participants need, in log order (``RoundClosed``, ``UpdateRejected``,
    ``RoundAveraged``, ``ShardReassigned``): forwarded to them, a peer reads no session events."""
    evaluations: Mapping[str, ModelEvaluated] = field(default_factory=dict)
    """The scheduler's own evaluation of each finished model, by peer."""
    ended: SessionEvent | None = None
    """The session's terminal event."""
    shard_rows: tuple[int, ...] = ()
    """fedavg with ``label_skew``: each shard's training rows, from ``SessionStarted.shard_histograms``."""
    init: tuple[str, str] | None = None
    """The starting model ``(uri, sha256)`` its ``SessionStarted`` named; None: seeded weights."""
    prepared: InitModelPrepared | None = None
    """A fork's recomputed starting model (``lineage``), once recorded."""
    # a search (``request.search``)
    search_log: tuple[Entry, ...] = ()
    """What the search's decisions replay (``scheduler.search``): each trial suggested, each rung
    figure, each trial's end, in log order."""
    trial_of: Mapping[str, str] = field(default_factory=dict)
    """peer_id -> the key of the latest run it was handed."""
    concluded: SearchConcluded | None = None
    failed_trials: frozenset[int] = frozenset()
    """Trials whose every attempt failed: counted once as failed, never run again."""

    @property
    def session_id(self) -> str:
        return self.request.session_id

    @property
    def searching(self) -> bool:
        return self.request.search is not None

    def run_key(self, peer_id: str) -> str:
        """The key of ``peer_id``'s run: its latest trial's in a search, itself otherwise."""
        return self.trial_of.get(peer_id, peer_id)

    def run_of(self, peer_id: str) -> Run | None:
        """``peer_id``'s latest run (in a search: its latest trial's, while it still holds it)."""
        run = self.runs.get(self.run_key(peer_id))
        return run if run is not None and run.peer(self.run_key(peer_id)) == peer_id else None

    def trials_started(self) -> int:
        return len({r.trial for r in self.runs.values() if r.trial is not None})

    def reruns(self) -> list[int]:
        """Trials whose latest run failed and that may run again, in trial order."""
        return sorted(
            r.trial
            for r in self.runs.values()
            if r.trial is not None and r.status == "failed" and r.trial not in self.failed_trials
        )

    def trials_left(self) -> bool:
        """Whether a search still has a trial to hand out (a new one, or one to run again)."""
        spec = self.request.search
        return spec is not None and (self.trials_started() < spec.trials or bool(self.reruns()))

    def training_rows(self, shard: int | None = None) -> int | None:
        """Rows a peer trains on: the whole training split, or ``shard``'s part of it (fedavg);
        None while the dataset is unknown or the shape cannot exist."""
        if self.dataset is None:
            return None
        try:
            rows = shapes.training_rows(self.dataset.rows, self.request.validation_split)
            if self.request.validation is not None:  # its own validation set: every row trains
                rows = self.dataset.rows
            if shard is None:
                return rows
            if self.request.round_options.sharding.name != "iid":  # the scheduler counted them at the start
                return self.shard_rows[shard] if 0 <= shard < len(self.shard_rows) else None
            return (
                shapes.shard_sizes(rows, self.request.num_peers)[shard] if 0 <= shard < self.request.num_peers else None
            )
        except shapes.ShapeError:
            return None

    def param_count(self) -> int:
        """The model's parameters on the dataset, for placement; 0 while the dataset is unknown."""
        if self.dataset is None:
            return 0
        try:
            return models.parameter_count(
                self.request.model, self.dataset.features, self.dataset.classes, self.data_shape()
            )
        except shapes.ShapeError:
            return 0

    def data_shape(self) -> models.DataShape | None:
        if self.dataset is None:
            return None
        d = self.dataset
        return models.data_shape(d.features, d.classes, list(d.shape))

    def activation_bytes(self) -> int:
        """The model's activations and their gradients for its largest batch (float32), for
        placement; 0 while the dataset is unknown or the spec cannot be built."""
        shape = self.data_shape()
        if shape is None:
            return 0
        try:
            activations = self.request.model.costs(shape).activations
        except shapes.ShapeError:
            return 0
        batch = max((hp.batch_size for hp in self.request.hyperparameters), default=1)
        return 8 * activations * batch

    def data_bytes(self) -> int:
        """The parsed dataset a peer holds in memory: rows x (features + label) x 4 bytes."""
        return 0 if self.dataset is None else 4 * self.dataset.rows * (self.dataset.features + 1)

    def max_model_bytes(self, model: ModelSpec | None = None) -> int:
        """The most bytes a model or update file of this session may hold: its tensors in float32,
        the standardization buffers, and room for the header's metadata; ``model``: a search
        trial's own (default: the session's)."""
        if self.dataset is None:
            return MAX_MODEL_BYTES
        try:
            params = models.parameter_count(model or self.request.model, self.dataset.features, self.dataset.classes)
        except shapes.ShapeError:
            return MAX_MODEL_BYTES
        return (
            4 * (params + 2 * self.dataset.features) + (1 << 20) + 512 * (self.dataset.features + self.dataset.classes)
        )

    def max_checkpoint_bytes(self) -> int:
        """The most bytes a sweep run's checkpoint may hold: the model's and up to two optimizer
        moments (AdamW's) in float32, and room for the step counts, the generators and the header."""
        return checkpoint_bytes(self.max_model_bytes())

    @property
    def rounds_open(self) -> bool:
        return 1 <= self.round <= self.request.rounds

    def training(self, peer_id: str) -> Run | None:
        """``peer_id``'s run if it is still training."""
        run = self.run_of(peer_id)
        return run if run is not None and run.status == "training" else None

    def orphan_shards(self) -> list[int]:
        """Shards whose peer failed and that no training peer holds."""
        held = {r.shard for r in self.runs.values() if r.status == "training"}
        return sorted({r.shard for r in self.runs.values() if r.status == "failed"} - held)


@dataclass(frozen=True)
class State:
    peers: Mapping[str, Peer] = field(default_factory=dict)
    sessions: Mapping[str, Session] = field(default_factory=dict)
    beats: Mapping[str, float] = field(default_factory=dict)
    """peer_id -> monotonic time of its last presence beat (not stored in the log)."""
    working: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    """peer_id -> (the ``Train`` id its latest beat that named one named, monotonic time of that beat)."""
    doing: Mapping[str, str | None] = field(default_factory=dict)
    """peer_id -> the ``Train`` id its latest beat named (None: idle)."""
    streak: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    """peer_id -> (the ``Train`` id its beats name, monotonic time of the first beat of this unbroken
    run of beats naming it): when a peer (back from a restart, say) took up its work again."""
    datasets: Mapping[str, Dataset] = field(default_factory=dict)
    position: int = 0
    started_at: float = 0.0
    """Monotonic time the scheduler started: a peer known from the log gets its grace period from here."""
    grace_from: float = 0.0
    """Monotonic time of the scheduler's latest reconnect or gap in its reading: beats it could not
    see then count against nobody, every peer gets a fresh timeout from here (``regrace``)."""
    heard_since: float = 0.0
    """UTC seconds of that same grace: no round's deadline counts the time before it (a round whose
    updates the scheduler could not read meanwhile gets its whole deadline again from here)."""

    @property
    def beats_since(self) -> float:
        """Monotonic time from which a peer never seen beating is judged."""
        return max(self.started_at, self.grace_from)

    def last_beat(self, peer_id: str) -> float:
        """When ``peer_id`` was last seen, for judging it: never before the latest grace."""
        return max(self.beats.get(peer_id, self.started_at), self.grace_from)

    def seen_working(self, peer_id: str, train: str) -> float:
        """When a beat of ``peer_id`` last named a ``Train`` whose id starts with ``train`` (a run's
        ``train_prefix``, or one id) (for judging: never before the latest grace)."""
        working = self.working.get(peer_id)
        seen = working[1] if working is not None and working[0].startswith(train) else float("-inf")
        return max(seen, self.beats_since)


# ------------------------------------------------------------------ fold


def evolve(state: State, seq: int, event: Event, observed_at: float) -> State:
    """``state`` with ``event`` (stream sequence ``seq``, stored at ``observed_at``) applied."""
    return fold(state, ((seq, event, observed_at),))


def fold(state: State, items: Iterable[tuple[int, Event, float]]) -> State:
    """``state`` with every ``(seq, event, observed_at)`` applied in order."""
    peers: dict[str, Peer] | None = None  # copied on the batch's first change
    sessions: dict[str, Session] | None = None
    datasets: dict[str, Dataset] | None = None
    position = state.position
    for seq, event, observed_at in items:
        position = max(position, seq)
        match event:
            case (
                PeerRegistered()
                | PeerWentOnline()
                | PeerWentOffline()
                | PeerLocked()
                | PeerReleased()
                | ReportRejected()
            ):
                if peers is None:
                    peers = dict(state.peers)
                peers[event.peer_id] = _evolve_peer(peers.get(event.peer_id), seq, event, observed_at)
            case DatasetUploaded():
                if datasets is None:
                    datasets = dict(state.datasets)
                datasets.setdefault(
                    event.dataset_id,
                    Dataset(rows=event.rows, features=event.features, classes=event.classes, shape=tuple(event.shape)),
                )
            case SessionRequested():
                known = (state.sessions if sessions is None else sessions).get(event.session_id)
                if sessions is None:
                    sessions = dict(state.sessions)
                dataset = (state.datasets if datasets is None else datasets).get(event.dataset_id)
                sessions[event.session_id] = (
                    Session(request=event, seq=seq, order=seq, dataset=dataset)
                    if known is None
                    else replace(known, seq=seq)
                )
            case _:
                session_id = getattr(event, "session_id", None)
                if not isinstance(session_id, str):
                    continue
                session = (state.sessions if sessions is None else sessions).get(session_id)
                if session is None:
                    continue
                if sessions is None:
                    sessions = dict(state.sessions)
                sessions[session_id] = _evolve_session(session, seq, event, observed_at)
    return replace(
        state,
        peers=state.peers if peers is None else peers,
        sessions=state.sessions if sessions is None else sessions,
        datasets=state.datasets if datasets is None else datasets,
        position=position,
    )


def fold_safely(state: State, items: Sequence[tuple[int, Event, float]]) -> tuple[State, list[tuple[int, Event, str]]]:
    """``fold``, but an event whose evolve raises is quarantined instead of stopping the fold: the
    state without it, and ``(seq, event, error)`` of each one left out. The batch is folded whole
    first; only a batch that fails is folded one event at a time."""
    try:
        return fold(state, items), []
    except Exception:  # narrowed down below, event by event
        pass
    quarantined: list[tuple[int, Event, str]] = []
    for seq, event, observed_at in items:
        try:
            state = evolve(state, seq, event, observed_at)
        except Exception as exc:
            quarantined.append((seq, event, repr(exc)))
            state = replace(state, position=max(state.position, seq))
    return state, quarantined


def _evolve_peer(
    peer: Peer | None,
    seq: int,
    event: PeerRegistered | PeerWentOnline | PeerWentOffline | PeerLocked | PeerReleased | ReportRejected,
    wall: float,
) -> Peer:
    peer = Peer(peer_id=event.peer_id) if peer is None else peer
    match event:
        case PeerRegistered():
            return replace(peer, name=event.name, device=event.device, specs=event.specs, seq=seq)
        case PeerWentOnline():
            return replace(peer, online=True, seq=seq)
        case PeerWentOffline():
            return replace(peer, online=False, seq=seq)
        case PeerLocked():
            return replace(peer, session_id=event.session_id, seq=seq, lock_seq=seq, locked_at=wall)
        case PeerReleased():
            freed = peer.session_id == event.session_id
            return replace(peer, session_id=None if freed else peer.session_id, seq=seq)
        case ReportRejected():  # on the peer's subject: only its compare-and-set sequence moves
            return replace(peer, seq=seq)


def _evolve_session(session: Session, seq: int, event: Event, wall: float) -> Session:
    session = replace(session, seq=seq)
    status = session_after(session.status, event)
    match event:
        case SessionStarted():
            if starts_session(session.status, event):
                runs = {
                    p: Run(hyperparameters=h, shard=event.shards.get(p, 0), since=wall)
                    for p, h in event.assignments.items()
                }
                shard_rows = tuple(sum(h) for h in event.shard_histograms)
                init = (event.init_uri, event.init_sha256) if event.init_uri else None
                session = replace(session, status=status, runs=runs, shard_rows=shard_rows, init=init)
                if strategies.rules(session.request.strategy).rounds:
                    session = replace(session, round=1, round_opened=wall, round_base=wall)
            return session
        case TrialStarted():
            return _trial_started(session, event, wall)
        case TrialPruned():
            key = trial_key(event.trial)
            run = session.runs.get(key)
            if run is not None and run.status == "training" and run.peer_id == event.peer_id:
                session = replace(session, search_log=(*session.search_log, Finished(event.trial, None, pruned=True)))
                return _with_run(session, key, replace(run, status="stopped", pruned=True))
        case CheckpointSaved():
            run = session.training(event.peer_id)
            if run is not None and run.trial == event.trial and _later(event, run.checkpoint):
                return _with_run(session, session.run_key(event.peer_id), replace(run, checkpoint=event))
        case SearchConcluded():
            if session.concluded is None:
                return replace(session, concluded=event)
        case Heartbeat():
            if (run := session.training(event.peer_id)) is not None and run.trial == event.trial:
                key = session.run_key(event.peer_id)
                run = replace(run, epoch=event.epoch, val_accuracy=event.val_accuracy)
                if run.trial is not None and session.request.search is not None:
                    trial = run.trial
                    metric, _ = session.request.search.resolved()
                    value = getattr(event, metric)
                    if value is not None and event.epoch not in run.figures:
                        run = replace(run, figures={**run.figures, event.epoch: value})
                        session = replace(
                            session, search_log=(*session.search_log, Reported(trial, event.epoch, value))
                        )
                return _with_run(session, key, run)
        case ModelUpdatePublished():
            # accepted only from a training participant, for the open round, once: a late or forged
            # update is ignored
            accepted = event.round == session.round and session.rounds_open and session.training(event.peer_id)
            if accepted and event.peer_id not in session.updates:
                update = RoundUpdate(
                    peer_id=event.peer_id, uri=event.uri, sha256=event.sha256, num_samples=event.num_samples
                )
                first = wall if session.first_update is None else session.first_update
                return replace(session, first_update=first, updates={**session.updates, event.peer_id: update})
        case RoundClosed():
            if event.round == session.round:
                return replace(
                    session,
                    closed={**session.closed, event.round: event},
                    facts=(*session.facts, event),
                    longest_round=max(session.longest_round, wall - session.round_opened),
                    round=event.round + 1,
                    round_opened=wall,
                    round_base=wall,
                    first_update=None,
                    updates={},
                )
        case ShardReassigned():
            if takes_new_runs(session.status) and event.to_peer_id not in session.runs:
                # a sweep's run taken over from its last checkpoint: the same hyperparameters and checkpoint
                sweep = not strategies.rules(session.request.strategy).rounds
                previous = session.runs.get(event.from_peer_id) if sweep else None
                run = Run(
                    hyperparameters=session.request.hyperparameters[event.shard]
                    if previous is None
                    else previous.hyperparameters,
                    shard=event.shard,
                    start_round=event.round,
                    since=wall,
                    checkpoint=None if previous is None else previous.checkpoint,
                )
                session = replace(session, facts=(*session.facts, event))
                return replace(_with_run(session, event.to_peer_id, run), round_base=max(session.round_base, wall))
        case UpdateRejected():  # as every fact a peer reported: kept only from a training participant
            if (
                session.training(event.reported_by)
                and event.round in session.closed
                and not any(
                    isinstance(f, UpdateRejected) and (f.round, f.peer_id) == (event.round, event.peer_id)
                    for f in session.facts
                )
            ):
                return replace(session, facts=(*session.facts, event))
        case RoundAveraged():
            if (
                session.training(event.peer_id)
                and event.round in session.closed
                and not any(isinstance(f, RoundAveraged) and f.round == event.round for f in session.facts)
            ):
                return replace(session, facts=(*session.facts, event))
        case InitModelPrepared():
            if session.prepared is None:
                return replace(session, prepared=event)
        case ModelEvaluated():
            key = event.peer_id if event.trial is None else trial_key(event.trial)
            if key not in session.evaluations:
                return replace(session, evaluations={**session.evaluations, key: event})
        case PeerDone():
            if (run := session.training(event.peer_id)) is not None and run.trial == event.trial:
                if run.trial is not None and session.request.search is not None:
                    metric, _ = session.request.search.resolved()
                    finished = Finished(run.trial, getattr(event, metric))
                    session = replace(session, search_log=(*session.search_log, finished))
                done = replace(
                    run,
                    status=run_after(run.status, event),
                    epoch=event.epochs,
                    val_accuracy=event.val_accuracy,
                    model_uri=event.model_uri,
                    model_sha256=event.model_sha256,
                )
                return _with_run(session, session.run_key(event.peer_id), done)
        case PeerFailed():
            run = session.training(event.peer_id)
            if run is not None and (event.trial is None or run.trial == event.trial):
                if run.trial is not None and run.attempt + 1 >= MAX_ATTEMPTS:  # its last run: a failed trial
                    session = replace(
                        session,
                        search_log=(*session.search_log, Finished(run.trial, None)),
                        failed_trials=session.failed_trials | {run.trial},
                    )
                failed = replace(run, status=run_after(run.status, event))
                return _with_run(session, session.run_key(event.peer_id), failed)
        case _:
            if ends_session(session.status, event):
                runs = {p: replace(r, status=run_after(r.status, event)) for p, r in session.runs.items()}
                ended = event if isinstance(event, TERMINAL_SESSION_EVENTS) else None
                return replace(session, status=status, runs=runs, ended=ended)
    return session


def _later(saved: CheckpointSaved, last: CheckpointSaved | None) -> bool:
    """Whether ``saved`` is after the run's last checkpoint (a run's checkpoints only move on)."""
    return last is None or saved.epoch > last.epoch


def _with_run(session: Session, key: str, run: Run) -> Session:
    return replace(session, runs={**session.runs, key: run})


def _trial_started(session: Session, event: TrialStarted, wall: float) -> Session:
    """A search's trial handed to a peer: a new run under the trial's key, its first attempt or a
    re-run of one whose run failed (the study saw its point once, at its first attempt)."""
    if session.status != "running" or session.request.search is None:
        return session
    key = trial_key(event.trial)
    known = session.runs.get(key)
    expected = 0 if known is None else known.attempt + 1
    if event.attempt != expected or (known is not None and known.status != "failed"):
        return session
    if known is None and event.trial != session.trials_started():
        return session  # trials start in order: a gap is a forged or stray fact
    if event.trial in session.failed_trials or session.training(event.peer_id) is not None:
        return session
    run = Run(
        hyperparameters=event.hyperparameters,
        since=wall,
        peer_id=event.peer_id,
        trial=event.trial,
        attempt=event.attempt,
        params=dict(event.params),
        model=event.model,
    )
    log = session.search_log if known is not None else (*session.search_log, Suggested(event.trial, dict(event.params)))
    session = replace(session, search_log=log, trial_of={**session.trial_of, event.peer_id: key})
    return _with_run(session, key, run)


def observe_presence(state: State, presence: Presence, now: float) -> State:
    """``state`` with ``presence``'s beat (and the ``Train`` it names) seen at monotonic time ``now``."""
    return observe_beats(state, {presence.peer_id: now}, {presence.peer_id: presence.train_id})


def observe_beats(state: State, beats: Mapping[str, float], doing: Mapping[str, str | None] | None = None) -> State:
    """``state`` with several beats (peer_id -> monotonic time) seen at once; ``doing``: peer_id ->
    the ``Train`` id that peer's beat named (None: none)."""
    if not beats:
        return state
    doing = doing or {}
    working = dict(state.working)
    streak = dict(state.streak)
    for peer_id, train in doing.items():
        if peer_id not in beats:
            continue
        if train is None:
            streak.pop(peer_id, None)
            continue
        working[peer_id] = (train, beats[peer_id])
        if streak.get(peer_id, ("", 0.0))[0] != train:
            streak[peer_id] = (train, beats[peer_id])
    return replace(
        state, beats={**state.beats, **beats}, working=working, doing={**state.doing, **doing}, streak=streak
    )


def regrace(state: State, now: float, wall: float | None = None) -> State:
    """``state`` after the scheduler reconnected, found a gap in its reading or could not reach the
    log, at monotonic ``now`` (UTC ``wall``): every peer's silence, every run's wait for a beat and
    every open round's deadline count from then (never a failure for what the platform hid)."""
    heard = state.heard_since if wall is None else max(state.heard_since, wall)
    return replace(state, grace_from=max(state.grace_from, now), heard_since=heard)


def regrace_rounds(state: State, wall: float) -> State:
    """``state`` while the peers' transfers cannot go through (the gateway serving a ``file://``
    store, or the object store, restarting), at UTC ``wall``: no open round's deadline counts the
    time until then; presence is another path (NATS), judged as before."""
    return replace(state, heard_since=max(state.heard_since, wall))
