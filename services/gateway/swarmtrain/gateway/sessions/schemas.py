"""What the session routes take and give: request bodies (their value rules are the contract's, see
``swarmtrain.common.events``) and the JSON they answer with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from litestar.datastructures import UploadFile

from swarmtrain.common import models
from swarmtrain.common.events import (
    SWEEP,
    Hyperparameters,
    ModelKind,
    ModelSpec,
    NumPeers,
    OnPeerFailure,
    PeerIds,
    Precision,
    Rounds,
    Seed,
    SessionEvent,
    Strategy,
    ValidationSplit,
)
from swarmtrain.common.fedopts import RoundOptions
from swarmtrain.common.search import SearchSpec
from swarmtrain.common.specs import Priority, QueueTimeout, Requirements
from swarmtrain.gateway.datasets import DEFAULT_LABEL

# ------------------------------------------------------------------ in


class HyperparametersIn(Hyperparameters, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The contract's ``Hyperparameters`` as a request gives them: no field of its own, none unknown."""


ModelIn = msgspec.defstruct(
    "ModelIn",
    [("kind", ModelKind, "mlp"), *((name, typ | None, None) for name, typ in models.INPUT_FIELDS.items())],
    kw_only=True,
    forbid_unknown_fields=True,
    module=__name__,
)
"""The model as a request gives it: ``kind`` (default ``mlp``) and every kind's fields flat, each
optional (unset: the kind's default), read from the contract's kinds (``common.models``), so a kind
added there is taken here with no line of its own. ``planning`` makes the kind's spec of it
(``models.from_fields``: a field of another kind, or one the kind needs and lacks, is a 400):

- ``mlp``: ``hidden``, fully connected layer widths (default [128, 64]);
- ``cnn``: ``input_shape`` (required) [C, H, W] of the image each row's feature columns hold
  (C*H*W = features), ``channels`` convolution widths (default [16, 32]), ``hidden`` after them;
- ``resnet``: ``depth`` blocks per stage, ``width``, ``stages``, ``input_shape`` (default: the
  images dataset's);
- ``transformer``: ``layers`` (a count), ``d_model``, ``heads``, ``context``, ``positions``,
  ``mlp_ratio``; on a text dataset;
- ``layers``: ``layers`` (a list of ``{"type": ...}`` layers and ``residual`` blocks), ``context``.
  ``layers`` is the one name two kinds give two types (a count, a list): the input takes either."""


class RequirementsIn(Requirements, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The contract's ``Requirements`` as a request gives them: no field of its own, none unknown."""


RoundOptionsIn = msgspec.defstruct(
    "RoundOptionsIn",
    [(f.name, f.type | None, None) for f in msgspec.structs.fields(RoundOptions)],
    kw_only=True,
    forbid_unknown_fields=True,
    module=__name__,
)
"""The round options as a request gives them: every field of the contract's ``RoundOptions``, each
optional (unset: the contract's default), so a round option added there is taken here with no
line of its own. ``SessionIn`` takes them flat (as clients always sent them) or as one
``round_options`` object; fedavg only (a strategy without rounds refuses any):

- ``aggregator``: ``{"name": "mean" | "trimmed_mean" | "median" | "krum" | "multi_krum", "beta", "f", "m"}``;
  unset: ``mean`` weighted by sample count. Krum needs ``num_peers >= 2f + 3``.
- ``outer``: ``{"name": "none" | "momentum" | "nesterov" | "adam", "lr", "beta1", "beta2", "eps"}``;
  unset: ``none`` (the aggregate is the next model).
- ``compression``: ``{"name": "none" | "fp16" | "bf16" | "int8"}``: how the updates travel.
- ``sharding``: ``{"name": "iid" | "label_skew", "alpha"}``: how the training rows are cut into shards.
- ``keep_local_optimizer``: keep each peer's local optimizer state across rounds.
- ``max_update_norm``: the largest L2 norm of a peer's update (its weights minus the round's
  starting model) that is averaged; unset: only non-finite or misshapen updates are rejected."""


class SessionIn(RoundOptionsIn, forbid_unknown_fields=True, kw_only=True):  # type: ignore[misc,valid-type,call-arg]
    """A session request. The round options (``RoundOptionsIn``) are its flat fields too."""

    dataset_id: str
    num_peers: NumPeers
    hyperparameters: list[HyperparametersIn] | HyperparametersIn
    """sweep: one set per peer, or one set for all of them; fedavg: one set (the peers train one model)."""
    strategy: Strategy = SWEEP
    model: ModelIn = msgspec.field(default_factory=ModelIn)  # type: ignore[valid-type]
    validation_split: ValidationSplit = 0.2
    validation_dataset_id: str | None = None
    """Another of the owner's datasets (same format, features and classes) to validate on, instead
    of holding ``validation_split`` of this one out: every row of this one then trains."""
    seed: Seed = 0
    rounds: Rounds = 1
    """fedavg: averaging rounds (each of ``hyperparameters.epochs`` local epochs); sweep: 1."""
    on_peer_failure: OnPeerFailure = "reassign"
    """fedavg: what a dead or stalled peer means: hand its shard to an idle peer, go on without it, or fail."""
    round_options: RoundOptionsIn | None = None  # type: ignore[valid-type]
    """fedavg: the round options as one object (each one given here or flat, not both)."""
    init_from: InitFromIn | None = None
    """Start from an earlier session's model (fine-tuning): one of yours, with the same model spec
    on a dataset of the same shape."""
    requirements: RequirementsIn | None = None
    """What a peer must have to take part; unset: any peer."""
    queue: bool = False
    """Wait ``queued`` until enough matching peers are idle, instead of a 400 now."""
    queue_timeout_s: QueueTimeout | None = None
    """Fail the session after this long in the queue (implies ``queue``)."""
    priority: Priority = 0
    """Higher is served first; first come, first served within a priority."""
    precision: Precision = "fp32"
    """fp32, or autocast to bf16 / fp16 (CUDA peers; a CPU peer runs bf16 where supported, or fails the run)."""
    search: SearchSpec | None = None
    """sweep: a space and a budget (``common.search``) instead of one set per peer: ``num_peers``
    trials at a time, each with ``hyperparameters`` (one object) and ``model`` with its point applied."""


class InitFromIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    session_id: str
    """One of your sessions."""
    round: Rounds | None = None
    """A fedavg session's round: start from that round's averaged model. Unset: its final model."""


class ForkIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A new session from a fedavg session's round; every other setting is the parent's unless given."""

    round: Rounds
    """Start from this round's averaged model."""
    exclude_peers: PeerIds = msgspec.field(default_factory=list)
    """Peers whose updates of that round are left out of the starting model (recomputed from the
    recorded updates by the parent's rule), and who take no part in the new session."""
    rounds: Rounds | None = None
    """Rounds to train; unset: the parent's rounds left after ``round`` (at least 1)."""
    hyperparameters: HyperparametersIn | None = None
    num_peers: NumPeers | None = None
    aggregator: dict[str, Any] | None = None
    """As the session request's ``aggregator``; unset: the parent's."""
    outer: dict[str, Any] | None = None
    """As the session request's ``outer``; unset: the parent's."""


@dataclass
class SessionStartForm:
    file: UploadFile
    num_peers: int
    hyperparameters: str
    """A JSON list of {epochs, batch_size, lr}, one per peer (or one JSON object for all)."""
    label_column: str = DEFAULT_LABEL


# ------------------------------------------------------------------ out


class SessionCreated(msgspec.Struct, kw_only=True):
    session_id: str
    status: str


class SessionCancelRequested(msgspec.Struct, kw_only=True):
    """The cancellation is in the event log; ``status`` is the session's as the read models have it."""

    session_id: str
    status: str


class SessionStartedOut(msgspec.Struct, kw_only=True):
    session_id: str
    status: str
    dataset_id: str


class PeerResult(msgspec.Struct, kw_only=True):
    peer_id: str
    status: str
    """training, done, failed or stopped."""
    hyperparameters: Hyperparameters
    shard: int | None
    """fedavg: the shard of the training rows this peer trains."""
    epoch: int
    epochs: int
    loss: float | None
    accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float | None
    reason: str | None
    precision: str | None = None
    """The precision its latest heartbeat says it computed in."""


class RejectedUpdate(msgspec.Struct, kw_only=True):
    peer_id: str
    reason: str


class RoundFigures(msgspec.Struct, kw_only=True):
    """fedavg: one closed round."""

    round: int
    closed_at: datetime
    included: list[str]
    """Peers whose updates make the round's average."""
    left_out: list[str]
    """Participants awaited in vain."""
    rejected: list[RejectedUpdate]
    num_samples: int
    loss: float | None
    """Sample-weighted mean training loss of the included updates."""
    accuracy: float | None
    val_loss: float | None
    """The averaged model on the validation split."""
    val_accuracy: float | None
    aggregator: str | None = None
    """The rule the peers applied (the session's, or ``median`` for a Krum that could not run)."""
    selected: list[str] = msgspec.field(default_factory=list)
    """The peers whose updates the aggregate holds (Krum: the ones it chose)."""
    update_bytes: int | None = None
    """The bytes of the round's update files (compressed ones are smaller)."""


class TrialOut(msgspec.Struct, kw_only=True):
    """One trial of a search."""

    trial: int
    attempt: int
    peer_id: str
    status: str
    """running, done, pruned, or failed (its run failed: it runs again unless it was its last)."""
    params: dict[str, Any]
    epoch: int
    epochs: int
    value: float | None
    """The search's metric: its latest epoch's, or its final figure."""
    curve: list[list[float]]
    """[[epoch, value], ...] as its heartbeats reported them."""
    rung: int | None
    reason: str | None
    train_seconds: float | None


class BestOut(msgspec.Struct, kw_only=True):
    trial: int
    params: dict[str, Any]
    value: float | None
    """The scheduler's own measurement of the trial's model (validation accuracy)."""
    hyperparameters: dict[str, Any]
    model: dict[str, Any]
    """The best configuration, whole: ``swarmtrain sessions start --from-best`` starts a session with it."""


class SearchOut(msgspec.Struct, kw_only=True):
    """A search's progress and, once it ended, what it found."""

    spec: SearchSpec
    done: int
    running: int
    pruned: int
    failed: int
    left: int
    """Trials not started yet."""
    eta_s: float | None
    """A time estimate for what is left: the mean seconds of a finished trial, times the trials left and
    running, over the peers (None until one finished)."""
    importances: dict[str, float]
    best: BestOut | None
    trials: list[TrialOut]


class SessionOut(msgspec.Struct, kw_only=True):
    session_id: str
    status: str
    """queued, running, completed, failed or cancelled."""
    strategy: str
    num_peers: int
    dataset_id: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    model: ModelSpec
    validation_split: float
    seed: int
    rounds: int
    on_peer_failure: str
    peers: list[PeerResult]
    round_figures: list[RoundFigures]
    best_peer_id: str | None
    best_val_accuracy: float | None
    val_accuracy: float | None
    """The session's model's accuracy on the validation split (fedavg: the final average's)."""
    model_available: bool
    reason: str | None
    parent_session_id: str | None = None
    """Lineage (``init_from``, a fork): the session this one started from ..."""
    parent_round: int | None = None
    """... and its round (None: its final model)."""
    excluded_peers: list[str] = msgspec.field(default_factory=list)
    """A fork's peers left out of its starting model and of its training."""
    requirements: Requirements | None = None
    queue: bool = False
    queue_timeout_s: float | None = None
    priority: int = 0
    precision: str = "fp32"
    queue_position: int | None = None
    """While queued: 1-based place in the swarm's queue (priority, then request order)."""
    placement: str | None = None
    """Once started: why these peers (the scheduler's placement reason)."""
    search: SearchOut | None = None
    """A sweep that searches: its trials, a time estimate, importances and the best configuration."""
    round_options: RoundOptions | None = None
    """A session that trains in rounds: its ``aggregator``, ``outer``, ``compression``, ``sharding``,
    ``keep_local_optimizer`` and ``max_update_norm`` as requested (the outer ``lr`` resolved)."""
    round_options_summary: str | None = None
    """The same in one line for a person (``fedopts.describe``): ``krum(f=1) · int8``."""
    task: str = "classification"
    """What the session learns (``common.tasks``): the figures' names and the leaderboard's order."""
    validation_dataset_id: str | None = None
    """The user's own validation set; None: ``validation_split`` of the dataset."""


class EventRecord(msgspec.Struct, kw_only=True):
    seq: int
    """The event's sequence in the event stream."""
    event: SessionEvent


class EventPage(msgspec.Struct, kw_only=True):
    events: list[EventRecord]
    next_after: int
    """Pass as ``after`` for the next page."""
    more: bool
    """Whether events past ``next_after`` exist already."""


class MetricPoint(msgspec.Struct, kw_only=True):
    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float
    at: datetime


class PeerSeries(msgspec.Struct, kw_only=True):
    peer_id: str
    points: list[MetricPoint]


class MetricsOut(msgspec.Struct, kw_only=True):
    session_id: str
    peers: list[PeerSeries]
