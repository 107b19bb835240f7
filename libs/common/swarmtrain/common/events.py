"""The event and command contract: msgspec Structs, one tagged union each, JSON on the wire.

Every message is frozen and keyword-only, tagged by its class name in the field ``type`` (the tag
is spelled out so that renaming a class never breaks stored history). Evolve only by adding fields
with defaults; a breaking change is a new type plus an upcaster.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec

from swarmtrain.common import subjects
from swarmtrain.common.fedopts import MAX_UPDATE_NORM as MAX_UPDATE_NORM
from swarmtrain.common.fedopts import ROUND_OPTIONS, RoundOptions
from swarmtrain.common.fedopts import UpdateNorm as UpdateNorm
from swarmtrain.common.models import CnnSpec as CnnSpec
from swarmtrain.common.models import MlpSpec as MlpSpec
from swarmtrain.common.models import ModelKind as ModelKind
from swarmtrain.common.models import ModelSpec as ModelSpec
from swarmtrain.common.search import SearchSpec as SearchSpec
from swarmtrain.common.specs import PeerSpecs, Priority, QueueTimeout, Requirements


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------ value rules
#
# Declared once here, checked by msgspec wherever these types are decoded: the gateway's request
# bodies (which reuse them) and every stored event. So a rule added here must hold for every event
# ever stored; a limit that depends on configuration (max epochs, peers, rounds) is the gateway's.

MAX_BATCH_SIZE: Final = 1 << 16
MAX_SEED: Final = 2**63 - 1
MAX_VALIDATION_SPLIT: Final = 0.9
MAX_LABEL_COLUMN: Final = 200
INT32_MAX: Final = 2**31 - 1
"""PostgreSQL ``integer``: every count, epoch, round, shard and row count is stored in one."""
INT64_MAX: Final = 2**63 - 1
"""PostgreSQL ``bigint``: sizes in bytes, seeds."""
MAX_EPOCHS: Final = 100_000
MAX_ROUNDS: Final = 10_000
"""A run's epochs are stored as ``epochs * rounds`` in an ``integer``: 10^9 fits."""
MAX_CHECKPOINT_URLS: Final = 256
"""The checkpoints one ``Train`` may write (the next ones after its start); a re-send signs more."""
MAX_PEERS: Final = 10_000
"""Peers in one session: bounds every per-peer list and map a message carries."""
MAX_ID: Final = 128
MAX_EVENT_ID: Final = 512
"""Event ids are derived from their cause (``<session>.<peer>.locked.<cause>``), so longer than an id."""
MAX_NAME: Final = 256
MAX_URI: Final = 4096
MAX_TEXT: Final = 8192
"""Reasons and other free text: ``bounded_text`` cuts a longer one down."""
MAX_REPORTED_REASON: Final = 2000
"""The longest reason a peer may report (``PeerFailed``, ``UpdateRejected``): the scheduler refuses
a longer one, so a peer cuts its own (``bounded_text(reason, MAX_REPORTED_REASON)``)."""
NO_NUL: Final = r"^[^\x00]*$"
"""PostgreSQL ``text`` holds no NUL: a string with one could be decoded but never stored."""
SUBJECT_TOKEN: Final = r"^[^\x00\s.*>]+$"
"""An id that becomes a subject token (``session.<id>.events``): no dot, wildcard or whitespace."""

Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=INT32_MAX)]
Count = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
"""A non-negative figure stored in a PostgreSQL ``integer``: epoch, rows, samples, round, shard."""
BigCount = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
"""Any finite float: NaN fails both bounds, an infinity one (JSON's ``1e999`` decodes as one)."""
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID, pattern=SUBJECT_TOKEN)]
"""A user, dataset, peer or session id: it names subjects, so it is one subject token."""
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EVENT_ID, pattern=NO_NUL)]
Ref = Annotated[str, msgspec.Meta(max_length=MAX_EVENT_ID, pattern=NO_NUL)]
"""A reference to an id that is not a subject token (a best peer, a report's event id)."""
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME, pattern=NO_NUL)]
Uri = Annotated[str, msgspec.Meta(max_length=MAX_URI, pattern=NO_NUL)]
Digest = Annotated[str, msgspec.Meta(max_length=MAX_NAME, pattern=NO_NUL)]
"""A sha256 (hex), kept loose in form, bounded in size."""
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT, pattern=NO_NUL)]
UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]
"""A timestamp with its time zone (UTC on the wire)."""

Epochs = Annotated[int, msgspec.Meta(ge=1, le=MAX_EPOCHS)]
BatchSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH_SIZE)]
LearningRate = Annotated[float, msgspec.Meta(gt=0, le=sys.float_info.max)]
"""Positive and finite (NaN fails ``gt``, infinity ``le``)."""
NumPeers = Annotated[int, msgspec.Meta(ge=1, le=MAX_PEERS)]
Rounds = Annotated[int, msgspec.Meta(ge=1, le=MAX_ROUNDS)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
ValidationSplit = Annotated[float, msgspec.Meta(gt=0, le=MAX_VALIDATION_SPLIT)]
"""The share of the rows held out for validation: more than none, and at most 0.9."""
LabelColumn = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LABEL_COLUMN, pattern=NO_NUL)]
PeerIds = Annotated[list[Id], msgspec.Meta(max_length=MAX_PEERS)]
MAX_CLASSES: Final = 1 << 16
Histogram = Annotated[list[Count], msgspec.Meta(max_length=MAX_CLASSES)]
"""Rows per class index, ``0 .. classes - 1``."""


def bounded_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` as a ``Text`` field takes it: NUL dropped, cut to ``limit`` characters (a reason
    quoting an exception or a traceback must never make its event undecodable)."""
    text = text.replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


Strategy = Literal["sweep", "fedavg"]
"""How a swarm trains; each strategy's rules live in a module of its own on each side that needs them."""
SWEEP: Final = "sweep"
FEDAVG: Final = "fedavg"
DataFormat = Literal["csv", "parquet", "npz", "images", "text"]
"""How a dataset's bytes are laid out; each format's facts are in ``common.formats``, its upload
check and its reader in one module of ``swarmtrain.training.formats``."""
CSV: Final = "csv"
OnPeerFailure = Literal["reassign", "continue", "fail"]
Precision = Literal["fp32", "bf16", "fp16"]
DataRead = Literal["whole", "shard"]
"""How a fedavg peer reads its data. ``whole``: the whole dataset in memory, ``Standardize`` fitted
by torch over the training split (every session before this field). ``shard``: one streamed pass
keeping only its shard and the validation rows, ``Standardize`` fitted by the streamed rule
(``training.stats``): its memory grows with the shard, not the dataset."""
Task = Literal["classification", "regression", "language_modeling"]
"""What a session learns: its facts are ``common.tasks``; the dataset's target decides it."""
CLASSIFICATION: Final = "classification"
"""What a peer computes in: fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler)."""


Optimizer = Literal["adamw", "sgd"]
"""The local optimizer: AdamW (with ``weight_decay`` 0, bit for bit the Adam of sessions stored
before the choice existed) or SGD with ``momentum``."""
LrSchedule = Literal["constant", "cosine"]
WeightDecay = Annotated[float, msgspec.Meta(ge=0, le=1)]
Momentum = Annotated[float, msgspec.Meta(ge=0, lt=1)]
ClipNorm = Annotated[float, msgspec.Meta(gt=0, le=1e6)]
MAX_WARMUP_STEPS: Final = 10_000_000
MAX_ACCUMULATION: Final = 1_024


class Hyperparameters(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How one run trains (``training/optim.py`` turns them into its optimizer steps). Each field
    past ``lr`` has the default that trains as sessions stored before it did."""

    epochs: Epochs
    """Epochs per peer (sweep), or local epochs per round (fedavg)."""
    batch_size: BatchSize
    lr: LearningRate
    optimizer: Optimizer = "adamw"
    weight_decay: WeightDecay = 0.0
    """AdamW's decoupled decay, SGD's L2 penalty."""
    momentum: Momentum = 0.9
    """sgd only."""
    grad_clip_norm: ClipNorm | None = None
    """Clip the gradients' total L2 norm to this before each step; None: no clipping."""
    lr_schedule: LrSchedule = "constant"
    """``cosine``: from ``lr`` down to 0 over the run's optimizer steps, after the warmup."""
    warmup_steps: Annotated[int, msgspec.Meta(ge=0, le=MAX_WARMUP_STEPS)] = 0
    """Optimizer steps over which the rate rises linearly to ``lr`` (either schedule)."""
    grad_accumulation: Annotated[int, msgspec.Meta(ge=1, le=MAX_ACCUMULATION)] = 1
    """Batches whose gradients are summed into one step: a step sees ``batch_size * grad_accumulation``
    samples, for batches larger than a peer's memory holds."""
    checkpoint_every: Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCHS)] = 0
    """A sweep's run saves a checkpoint (weights, optimizer, schedule step, data order, RNG) to the
    blob store after every this many epochs (``CheckpointSaved``), and a re-sent ``Train`` resumes
    from the last one; 0 (default): none. fedavg ignores it (its rounds are its checkpoints)."""


MAX_IMAGE_SIDE: Final = 4096
ImageSize = Annotated[
    list[Annotated[int, msgspec.Meta(ge=1, le=MAX_IMAGE_SIDE)]], msgspec.Meta(min_length=2, max_length=2)
]
"""[H, W] of an image dataset's pixels."""
ImageChannels = Literal[0, 1, 3]
TokenizerKind = Literal["byte", "bpe"]
BYTE_VOCAB: Final = 256
MAX_VOCAB: Final = 1 << 20


class TokenizerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A text corpus's tokenizer, fixed at upload: ``byte`` (UTF-8 bytes, vocabulary 256, nothing
    stored) or ``bpe`` (trained on the corpus with the ``tokenizers`` library, stored beside the
    dataset at ``uri``, so every peer and every replay uses the same one)."""

    kind: TokenizerKind = "byte"
    vocab_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_VOCAB)] = BYTE_VOCAB
    uri: Uri = ""
    """bpe: the tokenizer's JSON (``blobkeys.tokenizer``); "" for bytes."""
    sha256: Digest = ""


class DataSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How a peer reads a session's dataset: what it needs beyond the bytes (the dataset's format
    and how the upload fixed its reading). The default is a CSV, what every session before data
    formats meant."""

    format: DataFormat = CSV
    image_size: ImageSize | None = None
    """images: ``[H, W]`` every image is resized to (fixed at upload, so every peer reads the same
    pixels); None for a format of no images."""
    channels: ImageChannels = 0
    """images: 1 (grayscale) or 3 (RGB), as the upload found them; 0 for a format of no images."""
    tokenizer: TokenizerSpec | None = None
    """text: the corpus's tokenizer (``DatasetUploaded.tokenizer``); None for a format of no text."""
    task: Task = CLASSIFICATION
    """What the session learns, from the dataset's ``DatasetUploaded.target``."""


MAX_SHOWN_CLASSES: Final = 1000
"""A dataset's event carries its classes' row counts when it has at most this many."""
MAX_SHAPE: Final = 4
Shape = Annotated[list[Count], msgspec.Meta(max_length=MAX_SHAPE)]
"""The shape of one row's features: ``[features]`` for a table, ``[C, H, W]`` for images."""
ClassCounts = Annotated[dict[Name, Count], msgspec.Meta(max_length=MAX_SHOWN_CLASSES)]


class RoundUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """One peer's weights for a round, as named by ``RoundClosed``."""

    peer_id: Id
    uri: Uri
    sha256: Digest
    num_samples: Count


class ValidationData(msgspec.Struct, frozen=True, kw_only=True):
    """A session's own validation set (``validation_dataset_id``): another dataset of the owner of
    the same format, features and classes (the gateway checked). Every training row then trains,
    and the peers' checked figures and the scheduler's re-check are measured on this one."""

    dataset_id: Id
    uri: Uri
    sha256: Digest


class InitFrom(msgspec.Struct, frozen=True, kw_only=True):
    """Where a session's starting model comes from (fine-tuning, a fork): an earlier session of the
    same owner. Also the session's lineage: its parent and the parent's round."""

    session_id: Id
    """The parent session (the same owner's: the gateway 404s, the scheduler fails, otherwise)."""
    round: Count | None = None
    """fedavg parent: start from this round's average; None: the parent's final model."""
    exclude_peers: PeerIds = msgspec.field(default_factory=list)
    """A fork's ``exclude_peers``: the starting model is ``round``'s average recomputed without
    these peers' updates (the parent's rule), and the new session never places them."""


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    event_id: EventId = msgspec.field(default_factory=new_id)
    occurred_at: UtcTime = msgspec.field(default_factory=utcnow)


# ------------------------------------------------------------------ users and datasets


class UserRegistered(_Message, frozen=True, kw_only=True, tag="UserRegistered"):
    user_id: Id
    email: Name
    username: Name
    password_hash: Text

    @property
    def subject(self) -> str:
        return subjects.user_events(self.user_id)


class DatasetUploaded(_Message, frozen=True, kw_only=True, tag="DatasetUploaded"):
    dataset_id: Id
    owner_id: Id
    name: Name
    uri: Uri
    sha256: Digest
    size_bytes: BigCount
    rows: Count
    features: Count
    classes: Count
    label_column: LabelColumn
    format: DataFormat = CSV
    """How the bytes are laid out (an event from before data formats: a CSV)."""
    shape: Shape = msgspec.field(default_factory=list)
    """One row's feature shape (``[features]``, ``[C, H, W]``); empty in an event from before it."""
    class_counts: ClassCounts = msgspec.field(default_factory=dict)
    """Rows per class (empty when there are more than ``MAX_SHOWN_CLASSES``, or in an older event)."""
    tokens: BigCount = 0
    """text: the corpus's length in its tokenizer's tokens; 0 for a format of no text."""
    tokenizer: TokenizerSpec | None = None
    """text: the tokenizer fixed at upload; None for a format of no text."""
    target: Task = CLASSIFICATION
    """What the label is: classes, a regression target (a numeric label), or none (a corpus)."""
    target_range: Annotated[list[Finite], msgspec.Meta(max_length=2)] = msgspec.field(default_factory=list)
    """regression: ``[min, max]`` of the target; empty otherwise."""

    @property
    def subject(self) -> str:
        return subjects.dataset_events(self.dataset_id)


# ------------------------------------------------------------------ peers


class _PeerEvent(_Message, frozen=True, kw_only=True):
    peer_id: Id

    @property
    def subject(self) -> str:
        return subjects.peer_events(self.peer_id)


class PeerRegistered(_PeerEvent, frozen=True, kw_only=True, tag="PeerRegistered"):
    name: Name
    device: Name
    specs: PeerSpecs | None = None
    """What the peer has (cores, memory, GPUs, versions, labels): reported at registration and
    whenever it changes; None from a peer older than specs (placed as a CPU peer of unknown size)."""


class PeerWentOnline(_PeerEvent, frozen=True, kw_only=True, tag="PeerWentOnline"):
    pass


class PeerWentOffline(_PeerEvent, frozen=True, kw_only=True, tag="PeerWentOffline"):
    pass


class PeerLocked(_PeerEvent, frozen=True, kw_only=True, tag="PeerLocked"):
    session_id: Id


class PeerReleased(_PeerEvent, frozen=True, kw_only=True, tag="PeerReleased"):
    session_id: Id


# ------------------------------------------------------------------ sessions


class _SessionEvent(_Message, frozen=True, kw_only=True):
    session_id: Id

    @property
    def subject(self) -> str:
        return subjects.session_events(self.session_id)


class SessionRequested(_SessionEvent, frozen=True, kw_only=True, tag="SessionRequested"):
    owner_id: Id
    dataset_id: Id
    dataset_uri: Uri
    dataset_sha256: Digest
    label_column: LabelColumn
    num_peers: NumPeers
    strategy: Strategy = SWEEP
    model: ModelSpec
    hyperparameters: Annotated[list[Hyperparameters], msgspec.Meta(max_length=MAX_PEERS)]
    validation_split: ValidationSplit = 0.2
    seed: Seed = 0
    rounds: Rounds = 1
    """fedavg: number of averaging rounds (``hyperparameters[i].epochs`` local epochs each)."""
    on_peer_failure: OnPeerFailure = "reassign"
    """fedavg: what a dead or stalled participant means for the session."""
    round_options: RoundOptions = msgspec.field(default_factory=RoundOptions)
    """fedavg: how the rounds' updates become the next model (aggregator, outer step, compression,
    sharding, local optimizer, update bound), one value; events stored before it held these flat
    (``upcast`` reads them)."""
    init_from: InitFrom | None = None
    """Start from an earlier session's model instead of seeded weights (its lineage too)."""
    requirements: Requirements | None = None
    """What a peer must have to take part (device, GPU memory, memory, labels); None: any peer."""
    queue: bool = False
    """Wait ``queued`` until enough matching peers are idle; False (and no timeout): refused at once."""
    queue_timeout_s: QueueTimeout | None = None
    """Give up (``SessionFailed`` with the reason) after this long in the queue; implies ``queue``."""
    priority: Priority = 0
    """Higher is served first; first come, first served within a priority."""
    precision: Precision = "fp32"
    data: DataSpec = msgspec.field(default_factory=DataSpec)
    """How the dataset is read (its format); the default: a CSV."""
    data_read: DataRead = "whole"
    """How a fedavg peer reads the dataset (``DataRead``); the gateway sets ``shard`` for new
    fedavg sessions, so a log written before keeps its meaning."""
    search: SearchSpec | None = None
    """sweep: a space and a budget instead of one set per peer (``common.search``): ``num_peers``
    trials run at a time, each with ``hyperparameters[0]`` and ``model`` with its point applied;
    None: the list, one set per peer."""
    validation: ValidationData | None = None
    """The user's own validation set instead of ``validation_split``; None: the split."""


class SessionStarted(_SessionEvent, frozen=True, kw_only=True, tag="SessionStarted"):
    assignments: Annotated[dict[Id, Hyperparameters], msgspec.Meta(max_length=MAX_PEERS)]
    shards: Annotated[dict[Id, Count], msgspec.Meta(max_length=MAX_PEERS)] = msgspec.field(default_factory=dict)
    """fedavg: peer_id -> shard index (0 .. num_peers-1)."""
    shard_histograms: Annotated[list[Histogram], msgspec.Meta(max_length=MAX_PEERS)] = msgspec.field(
        default_factory=list
    )
    """fedavg with ``label_skew`` sharding: per shard index, its training rows per class index, as
    the scheduler computed them from the dataset (empty otherwise: ``iid`` shards' sizes follow
    from the dataset's row count)."""
    init_uri: Uri = ""
    """The starting model the scheduler resolved from ``init_from`` ("" for seeded weights): a
    parent's final model, a round's stored average, or an ``InitModelPrepared`` recomputation."""
    init_sha256: Digest = ""
    placement: Text = ""
    """Why these peers: the placement's reason (requirements, GPU or CPU first, memory needed)."""


TrialNumber = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
"""A search's trial, counted from 0 in the order the scheduler started them."""
ParamValue = float | int | Annotated[str, msgspec.Meta(max_length=MAX_NAME, pattern=NO_NUL)]
Params = Annotated[dict[Name, ParamValue], msgspec.Meta(max_length=64)]
"""A trial's point: a search space's key -> the value it got."""


class Heartbeat(_SessionEvent, frozen=True, kw_only=True, tag="Heartbeat"):
    peer_id: Id
    trial: TrialNumber | None = None
    """A search's trial this epoch belongs to (``Train.trial``); None outside a search."""
    epoch: Count
    epochs: Count
    loss: Finite
    accuracy: Finite
    val_loss: Finite | None = None
    val_accuracy: Finite | None = None
    samples_per_s: Finite
    precision: Precision = "fp32"
    """The precision the epoch ran in."""
    figures: Annotated[dict[Name, Finite], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=dict)
    """The task's own validation figures besides loss and score (``common.tasks``: MAE, RMSE, R²,
    perplexity, tokens/s); empty for classification and in events from before tasks."""


class PeerDone(_SessionEvent, frozen=True, kw_only=True, tag="PeerDone"):
    peer_id: Id
    trial: TrialNumber | None = None
    """A search's trial this model is of; None outside a search."""
    model_uri: Uri
    model_sha256: Digest
    epochs: Count
    loss: Finite
    accuracy: Finite
    val_loss: Finite | None = None
    val_accuracy: Finite | None = None
    train_seconds: Finite


class ModelUpdatePublished(_SessionEvent, frozen=True, kw_only=True, tag="ModelUpdatePublished"):
    """fedavg: a participant's weights after its local epochs of ``round``."""

    round: Count
    peer_id: Id
    uri: Uri
    sha256: Digest
    num_samples: Count
    loss: Finite
    accuracy: Finite
    nbytes: BigCount = 0
    """The size of the update file the peer published (compressed, per the session's
    ``compression``); 0 in events from before it was recorded."""


class RoundClosed(_SessionEvent, frozen=True, kw_only=True, tag="RoundClosed"):
    """fedavg: exactly the updates that make round ``round``'s average; ``left_out`` were awaited in vain."""

    round: Count
    updates: Annotated[list[RoundUpdate], msgspec.Meta(max_length=MAX_PEERS)]
    left_out: PeerIds = msgspec.field(default_factory=list)


class UpdateRejected(_SessionEvent, frozen=True, kw_only=True, tag="UpdateRejected"):
    """fedavg: an update named by ``RoundClosed`` that no peer applies (wrong tensors, NaN/Inf, bad hash)."""

    round: Count
    peer_id: Id
    reason: Text
    reported_by: Id


class RoundAveraged(_SessionEvent, frozen=True, kw_only=True, tag="RoundAveraged"):
    """fedavg: the weighted average of a closed round, stored at ``uri`` (identical on every peer)."""

    round: Count
    uri: Uri
    sha256: Digest
    peer_id: Id
    val_loss: Finite | None = None
    val_accuracy: Finite | None = None
    """The averaged model on the whole validation split."""
    aggregator: Name = "mean"
    """The rule that made the aggregate: the session's, or ``median`` where Krum had too few
    acceptable updates for its ``f`` (``n < 2f + 3``)."""
    selected: PeerIds = msgspec.field(default_factory=list)
    """The peers whose updates went into the aggregate, sorted: every accepted one for the
    coordinate-wise rules, Krum's choice for ``krum`` / ``multi_krum``."""
    update_bytes: BigCount = 0
    """The bytes of the round's update files that matched their sha256 (what each peer fetched)."""


class InitModelPrepared(_SessionEvent, frozen=True, kw_only=True, tag="InitModelPrepared"):
    """A fork's starting model, recomputed by the scheduler: round ``round`` of ``parent_session_id``
    averaged again from the updates its ``RoundClosed`` named, without ``excluded`` (the parent's
    rule), stored under this session's prefix at ``uri``."""

    parent_session_id: Id
    round: Count
    excluded: PeerIds = msgspec.field(default_factory=list)
    included: PeerIds = msgspec.field(default_factory=list)
    """The updates the recomputed average holds (none: the round's starting weights)."""
    uri: Uri
    sha256: Digest


class ShardReassigned(_SessionEvent, frozen=True, kw_only=True, tag="ShardReassigned"):
    """fedavg: a failed participant's shard handed to an idle peer, from round ``round`` on."""

    shard: Count
    from_peer_id: Id
    to_peer_id: Id
    round: Count


class CheckpointSaved(_SessionEvent, frozen=True, kw_only=True, tag="CheckpointSaved"):
    """A sweep's run saved its training state after ``epoch`` (``Hyperparameters.checkpoint_every``)
    at ``uri`` (``Train.checkpoint_urls``' object); a re-sent ``Train`` resumes from the last one.
    A peer's report, checked (its run, the URI it was handed, epochs rising, a bounded size)."""

    peer_id: Id
    trial: TrialNumber | None = None
    epoch: Count
    uri: Uri
    sha256: Digest
    nbytes: BigCount


class PeerFailed(_SessionEvent, frozen=True, kw_only=True, tag="PeerFailed"):
    peer_id: Id
    reason: Text
    trial: TrialNumber | None = None
    """A search's trial whose run failed (it is run again); None outside a search."""


class TrialStarted(_SessionEvent, frozen=True, kw_only=True, tag="TrialStarted"):
    """A search's trial handed to a peer: its point (the sampler's suggestion, a pure function of
    the log before it) and what it trains with. ``attempt`` > 0: the same trial run again after its
    peer's run failed (the point is the first attempt's; the study counts the trial once)."""

    trial: TrialNumber
    attempt: Count = 0
    peer_id: Id
    params: Params
    hyperparameters: Hyperparameters
    model: ModelSpec


class TrialPruned(_SessionEvent, frozen=True, kw_only=True, tag="TrialPruned"):
    """The search's pruner stopped a trial at a rung (an epoch), from the figures in the log."""

    trial: TrialNumber
    peer_id: Id
    rung: Count
    value: Finite | None = None
    """The trial's figure at the rung."""
    reason: Text


class SearchConcluded(_SessionEvent, frozen=True, kw_only=True, tag="SearchConcluded"):
    """What a finished search found, computed by the scheduler from the log (Optuna's importance
    evaluator on the finished trials): each key's importance, most important first, and the best
    trial by the scheduler's own re-evaluation where it made one."""

    importances: Annotated[dict[Name, Finite], msgspec.Meta(max_length=64)]
    best_trial: TrialNumber | None = None
    best_params: Params = msgspec.field(default_factory=dict)
    best_value: Finite | None = None
    done: Count = 0
    pruned: Count = 0
    failed: Count = 0


class SessionCompleted(_SessionEvent, frozen=True, kw_only=True, tag="SessionCompleted"):
    best_peer_id: Ref
    best_val_accuracy: Finite | None
    model_uri: Uri
    checked_val_accuracy: Finite | None = None
    """The best model's validation accuracy as a service measured it (``ModelEvaluated``), beside
    the peer's own claim in ``best_val_accuracy``; None where nothing re-evaluated it."""
    best_trial: TrialNumber | None = None
    """A search: the trial whose model is the session's."""


class ModelEvaluated(_SessionEvent, frozen=True, kw_only=True, tag="ModelEvaluated"):
    """A peer's finished model, re-evaluated by the scheduler on the session's validation split
    (the peer's claim is not believed). ``val_accuracy`` None: it could not be evaluated (its bytes
    differ from the sha256 of its ``PeerDone``, it does not load or does not fit the data), and
    ``reason`` says why; such a model never wins."""

    peer_id: Ref
    val_loss: Finite | None = None
    val_accuracy: Finite | None = None
    model_sha256: Digest
    reason: Text | None = None
    trial: TrialNumber | None = None
    """A search: the trial whose model this is."""


class SessionFailed(_SessionEvent, frozen=True, kw_only=True, tag="SessionFailed"):
    reason: Text


class SessionCancelled(_SessionEvent, frozen=True, kw_only=True, tag="SessionCancelled"):
    reason: Text = "cancelled by its owner"


class ReportRejected(_PeerEvent, frozen=True, kw_only=True, tag="ReportRejected"):
    """A peer's report that the scheduler refused to turn into a fact, and why (not assigned, round
    not open, a value out of bounds, a URI it was not handed, a sample count that disagrees with
    its shard ...). Stored on the reporting peer's own subject."""

    session_id: Id | None = None
    report_type: Name
    report_id: Ref
    reason: Text


SessionEvent = (
    SessionRequested
    | SessionStarted
    | Heartbeat
    | PeerDone
    | PeerFailed
    | CheckpointSaved
    | ModelUpdatePublished
    | RoundClosed
    | UpdateRejected
    | RoundAveraged
    | ShardReassigned
    | InitModelPrepared
    | TrialStarted
    | TrialPruned
    | SearchConcluded
    | ModelEvaluated
    | SessionCompleted
    | SessionFailed
    | SessionCancelled
)
Event = (
    UserRegistered
    | DatasetUploaded
    | PeerRegistered
    | PeerWentOnline
    | PeerWentOffline
    | PeerLocked
    | PeerReleased
    | ReportRejected
    | SessionEvent
)
"""Every stored fact: the session's (``SessionEvent``) and the others'."""
TERMINAL_SESSION_EVENTS = (SessionCompleted, SessionFailed, SessionCancelled)
Report = (
    PeerRegistered
    | Heartbeat
    | ModelUpdatePublished
    | PeerDone
    | PeerFailed
    | UpdateRejected
    | RoundAveraged
    | CheckpointSaved
)
"""What a peer may say, on ``peer.<its id>.reports`` only: claims that the scheduler checks against
what it knows before it appends the same message as a fact, or a ``ReportRejected``."""


# ------------------------------------------------------------------ commands (peer.<id>.command)


class _Command(_Message, frozen=True, kw_only=True):
    peer_id: Id

    @property
    def subject(self) -> str:
        return subjects.peer_command(self.peer_id)


class Train(_Command, frozen=True, kw_only=True, tag="Train"):
    session_id: Id
    dataset_uri: Uri
    dataset_sha256: Digest
    label_column: LabelColumn
    model: ModelSpec
    hyperparameters: Hyperparameters
    validation_split: ValidationSplit
    seed: Seed
    output_uri: Uri
    strategy: Strategy = SWEEP
    shard: Count = 0
    num_shards: Count = 1
    rounds: Rounds = 1
    start_round: Count = 1
    """fedavg: the first round this peer trains; it starts from the average of the round before."""
    rounds_uri: Uri = ""
    """fedavg: updates go to ``<rounds_uri>/<round>/<peer_id>.safetensors``, averages to
    ``<rounds_uri>/<round>/average.safetensors``."""
    # Object-scoped, expiring URLs (``swarmtrain.common.signing``): what the peer may read and
    # write, so that it holds no storage credentials. The ``*_uri`` fields above stay the names of
    # the objects, which the peer reports back and the scheduler checks.
    dataset_url: Uri = ""
    """Signed GET of the dataset."""
    output_url: Uri = ""
    """Signed PUT of this peer's model (``output_uri``)."""
    update_urls: Annotated[dict[Count, Uri], msgspec.Meta(max_length=MAX_ROUNDS)] = msgspec.field(default_factory=dict)
    """fedavg: round -> signed PUT of this peer's update for that round."""
    average_urls: Annotated[dict[Count, Uri], msgspec.Meta(max_length=MAX_ROUNDS)] = msgspec.field(default_factory=dict)
    """fedavg: round -> signed PUT of that round's average."""
    round_options: RoundOptions = msgspec.field(default_factory=RoundOptions)
    """fedavg: the session's round options (``SessionRequested.round_options``), whole."""
    init_uri: Uri = ""
    """The starting model (``SessionStarted.init_uri``): "" trains from seeded weights."""
    init_url: Uri = ""
    """Signed GET of ``init_uri``."""
    init_sha256: Digest = ""
    """The starting model's sha256: the peer checks the bytes and loads its tensors (which must
    match the model's names and shapes) after fitting the standardization, before training."""
    precision: Precision = "fp32"
    """The session's precision: a peer that cannot compute in it fails the run with the reason."""
    validation_uri: Uri = ""
    """The session's own validation set (``SessionRequested.validation``); "": ``validation_split``."""
    validation_url: Uri = ""
    """Signed GET of ``validation_uri``."""
    validation_sha256: Digest = ""
    data: DataSpec = msgspec.field(default_factory=DataSpec)
    """How the peer reads the dataset (``SessionRequested.data``)."""
    data_read: DataRead = "whole"
    """fedavg: the whole dataset or only the shard (``SessionRequested.data_read``)."""
    trial: TrialNumber | None = None
    """A search's trial: its reports name it (a peer takes one ``Train`` per trial); None outside a search."""
    checkpoint_urls: Annotated[dict[Count, Uri], msgspec.Meta(max_length=MAX_CHECKPOINT_URLS)] = msgspec.field(
        default_factory=dict
    )
    """A sweep's run with ``checkpoint_every``: epoch -> signed PUT of that epoch's checkpoint, at
    ``blobkeys.checkpoint_uri(checkpoints_uri, epoch)``; an epoch without one saves none."""
    checkpoints_uri: Uri = ""
    """The folder of this run's checkpoints (``blobkeys.checkpoints``)."""
    resume_epoch: Count = 0
    """The epoch the last checkpoint was saved after (``CheckpointSaved``); 0: from the start."""
    resume_uri: Uri = ""
    resume_url: Uri = ""
    """Signed GET of ``resume_uri``."""
    resume_sha256: Digest = ""


class Stop(_Command, frozen=True, kw_only=True, tag="Stop"):
    session_id: Id
    trial: TrialNumber | None = None
    """Stop only this trial's job (pruned); None: the session's, whatever it runs."""


class SessionFact(_Command, frozen=True, kw_only=True, tag="SessionFact"):
    """A fact of a session the peer is assigned to, forwarded by the scheduler: a peer reads no
    session's events itself. ``urls`` maps each object the fact names (an update's or average's
    ``uri``) to a signed GET URL the peer may fetch it with."""

    session_id: Id
    fact: SessionEvent
    urls: Annotated[dict[Uri, Uri], msgspec.Meta(max_length=MAX_PEERS)] = msgspec.field(default_factory=dict)


Command = Train | Stop | SessionFact


# ------------------------------------------------------------------ presence (plain NATS, not stored)


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    peer_id: Id
    name: Name
    device: Name
    session_id: Id | None = None
    """The session whose job the peer is working on, if any."""
    train_id: Ref | None = None
    """The ``event_id`` of the ``Train`` it is working on: the scheduler compares it with its locks
    and re-sends a ``Train`` that no beat shows being worked on."""

    @property
    def subject(self) -> str:
        return subjects.peer_presence(self.peer_id)


PRESENCE_SUBJECTS = subjects.PEER_PRESENCE

# ------------------------------------------------------------------ stored history: the upcaster

_UPCAST = frozenset({"SessionRequested", "Train"})
"""The messages whose shape changed since they were first stored (see :func:`upcast`)."""


def upcast(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored message (decoded JSON) in today's shape, changed in place and returned; a message
    of today's shape is returned as it is. The one place that knows an old shape:

    - ``SessionRequested`` and ``Train`` held the round options flat (``aggregator``, ``outer``,
      ``compression``, ``sharding``, ``keep_local_optimizer``, ``max_update_norm``); today they
      are one value, ``round_options``;
    - their ``model`` could omit ``kind`` (it defaulted to ``mlp``); today it is the tag of the
      ``ModelSpec`` union (an mlp's stored ``input_shape`` and ``channels`` are ignored);
    - a ``SessionFact`` carries a session event, upcast the same way.
    """
    _upcast(raw)
    return raw


def _upcast(raw: dict[str, Any]) -> bool:
    """:func:`upcast`; whether it changed anything."""
    kind = raw.get("type")
    if kind == "SessionFact" and isinstance(raw.get("fact"), dict):
        return _upcast(raw["fact"])
    if kind not in _UPCAST:
        return False
    changed = False
    model = raw.get("model")
    if isinstance(model, dict) and "kind" not in model:
        model["kind"] = "mlp"  # the kind's default before the spec was a tagged union
        changed = True
    flat = {name: raw.pop(name) for name in ROUND_OPTIONS if name in raw}
    if flat:
        nested = raw.get("round_options")
        raw["round_options"] = flat | (nested if isinstance(nested, dict) else {})
        changed = True
    return changed


_event_decoder = msgspec.json.Decoder(Event)
_command_decoder = msgspec.json.Decoder(Command)
_presence_decoder = msgspec.json.Decoder(Presence)
_report_decoder = msgspec.json.Decoder(Report)
_encoder = msgspec.json.Encoder()
_raw_decoder = msgspec.json.Decoder(dict[str, Any])


def _upcast_bytes(data: bytes) -> bytes | None:
    """``data`` upcast, or None where it is of today's shape already (or no JSON object at all)."""
    try:
        raw = _raw_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return _encoder.encode(raw) if _upcast(raw) else None


def encode(message: Event | Command | Presence) -> bytes:
    return _encoder.encode(message)


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes, of_changed_type: Callable[[Any], bool]) -> Any:
    """``data`` decoded, through :func:`upcast` where it does not decode as today's shape or is of
    a type that changed shape (``of_changed_type``) and its upcast JSON differs."""
    try:
        message = decoder.decode(data)
    except msgspec.ValidationError:
        if (upcast_data := _upcast_bytes(data)) is None:
            raise
        return decoder.decode(upcast_data)
    if of_changed_type(message) and (upcast_data := _upcast_bytes(data)) is not None:
        return decoder.decode(upcast_data)
    return message


def decode_event(data: bytes) -> Event:
    """Raises ``msgspec.ValidationError`` or ``msgspec.DecodeError`` for a malformed message.

    Stored history is read through :func:`upcast` (once per request: every other event decodes once)."""
    event: Event = _decode(_event_decoder, data, lambda e: isinstance(e, SessionRequested))
    return event


def decode_command(data: bytes) -> Command:
    """As :func:`decode_event`, for the commands stream."""
    command: Command = _decode(
        _command_decoder,
        data,
        lambda c: isinstance(c, Train) or (isinstance(c, SessionFact) and isinstance(c.fact, SessionRequested)),
    )
    return command


def decode_report(data: bytes) -> Report:
    report: Report = _report_decoder.decode(data)
    return report


def decode_presence(data: bytes) -> Presence:
    presence: Presence = _presence_decoder.decode(data)
    return presence


def to_builtins(message: Any) -> Any:
    return msgspec.to_builtins(message)
