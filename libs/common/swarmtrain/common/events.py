"""The event and command contract: msgspec Structs, one tagged union each, JSON on the wire.

Every message is frozen and keyword-only, tagged by its class name in the field ``type`` (the tag
is spelled out so that renaming a class never breaks stored history). Evolve only by adding fields
with defaults; a breaking change is a new type plus an upcaster.
"""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec

from swarmtrain.common import subjects


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
MAX_WIDTH: Final = 1 << 16
MAX_LAYERS: Final = 32
MAX_SEED: Final = 2**63 - 1
MAX_VALIDATION_SPLIT: Final = 0.9
MAX_LABEL_COLUMN: Final = 200

Epochs = Annotated[int, msgspec.Meta(ge=1)]
BatchSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH_SIZE)]
LearningRate = Annotated[float, msgspec.Meta(gt=0, le=sys.float_info.max)]
"""Positive and finite (NaN fails ``gt``, infinity ``le``)."""
Width = Annotated[int, msgspec.Meta(ge=1, le=MAX_WIDTH)]
"""A layer's units, a convolution's channels, one side of an input shape."""
Widths = Annotated[list[Width], msgspec.Meta(max_length=MAX_LAYERS)]
Channels = Annotated[list[Width], msgspec.Meta(min_length=1, max_length=MAX_LAYERS)]
InputShape = Annotated[list[Width], msgspec.Meta(min_length=3, max_length=3)]
"""[C, H, W]."""
NumPeers = Annotated[int, msgspec.Meta(ge=1)]
Rounds = Annotated[int, msgspec.Meta(ge=1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
ValidationSplit = Annotated[float, msgspec.Meta(gt=0, le=MAX_VALIDATION_SPLIT)]
"""The share of the rows held out for validation: more than none, and at most 0.9."""
LabelColumn = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LABEL_COLUMN)]

ModelKind = Literal["mlp", "cnn"]
Strategy = Literal["sweep", "fedavg"]
"""How a swarm trains; each strategy's rules live in a module of its own on each side that needs them."""
SWEEP: Final = "sweep"
FEDAVG: Final = "fedavg"
OnPeerFailure = Literal["reassign", "continue", "fail"]


class Hyperparameters(msgspec.Struct, frozen=True, kw_only=True):
    epochs: Epochs
    batch_size: BatchSize
    lr: LearningRate


DEFAULT_HIDDEN: Final = (128, 64)
DEFAULT_CHANNELS: Final = (16, 32)


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    kind: ModelKind = "mlp"
    hidden: Widths = msgspec.field(default_factory=lambda: list(DEFAULT_HIDDEN))
    """Fully connected layer widths (after the convolutions, for a cnn)."""
    input_shape: InputShape | None = None
    """[C, H, W] of image data given as flat pixel columns; required for a cnn."""
    channels: Channels = msgspec.field(default_factory=lambda: list(DEFAULT_CHANNELS))
    """A cnn's convolution widths: 3x3 conv, ReLU, then 2x2 max-pool while the image is at least 2x2."""


class RoundUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """One peer's weights for a round, as named by ``RoundClosed``."""

    peer_id: str
    uri: str
    sha256: str
    num_samples: int


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    event_id: str = msgspec.field(default_factory=new_id)
    occurred_at: datetime = msgspec.field(default_factory=utcnow)


# ------------------------------------------------------------------ users and datasets


class UserRegistered(_Message, frozen=True, kw_only=True, tag="UserRegistered"):
    user_id: str
    email: str
    username: str
    password_hash: str

    @property
    def subject(self) -> str:
        return subjects.user_events(self.user_id)


class DatasetUploaded(_Message, frozen=True, kw_only=True, tag="DatasetUploaded"):
    dataset_id: str
    owner_id: str
    name: str
    uri: str
    sha256: str
    size_bytes: int
    rows: int
    features: int
    classes: int
    label_column: LabelColumn

    @property
    def subject(self) -> str:
        return subjects.dataset_events(self.dataset_id)


# ------------------------------------------------------------------ peers


class _PeerEvent(_Message, frozen=True, kw_only=True):
    peer_id: str

    @property
    def subject(self) -> str:
        return subjects.peer_events(self.peer_id)


class PeerRegistered(_PeerEvent, frozen=True, kw_only=True, tag="PeerRegistered"):
    name: str
    device: str


class PeerWentOnline(_PeerEvent, frozen=True, kw_only=True, tag="PeerWentOnline"):
    pass


class PeerWentOffline(_PeerEvent, frozen=True, kw_only=True, tag="PeerWentOffline"):
    pass


class PeerLocked(_PeerEvent, frozen=True, kw_only=True, tag="PeerLocked"):
    session_id: str


class PeerReleased(_PeerEvent, frozen=True, kw_only=True, tag="PeerReleased"):
    session_id: str


# ------------------------------------------------------------------ sessions


class _SessionEvent(_Message, frozen=True, kw_only=True):
    session_id: str

    @property
    def subject(self) -> str:
        return subjects.session_events(self.session_id)


class SessionRequested(_SessionEvent, frozen=True, kw_only=True, tag="SessionRequested"):
    owner_id: str
    dataset_id: str
    dataset_uri: str
    dataset_sha256: str
    label_column: LabelColumn
    num_peers: NumPeers
    strategy: Strategy = SWEEP
    model: ModelSpec
    hyperparameters: list[Hyperparameters]
    validation_split: ValidationSplit = 0.2
    seed: Seed = 0
    rounds: Rounds = 1
    """fedavg: number of averaging rounds (``hyperparameters[i].epochs`` local epochs each)."""
    on_peer_failure: OnPeerFailure = "reassign"
    """fedavg: what a dead or stalled participant means for the session."""


class SessionStarted(_SessionEvent, frozen=True, kw_only=True, tag="SessionStarted"):
    assignments: dict[str, Hyperparameters]
    shards: dict[str, int] = msgspec.field(default_factory=dict)
    """fedavg: peer_id -> shard index (0 .. num_peers-1)."""


class Heartbeat(_SessionEvent, frozen=True, kw_only=True, tag="Heartbeat"):
    peer_id: str
    epoch: int
    epochs: int
    loss: float
    accuracy: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    samples_per_s: float


class PeerDone(_SessionEvent, frozen=True, kw_only=True, tag="PeerDone"):
    peer_id: str
    model_uri: str
    model_sha256: str
    epochs: int
    loss: float
    accuracy: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    train_seconds: float


class ModelUpdatePublished(_SessionEvent, frozen=True, kw_only=True, tag="ModelUpdatePublished"):
    """fedavg: a participant's weights after its local epochs of ``round``."""

    round: int
    peer_id: str
    uri: str
    sha256: str
    num_samples: int
    loss: float
    accuracy: float


class RoundClosed(_SessionEvent, frozen=True, kw_only=True, tag="RoundClosed"):
    """fedavg: exactly the updates that make round ``round``'s average; ``left_out`` were awaited in vain."""

    round: int
    updates: list[RoundUpdate]
    left_out: list[str] = msgspec.field(default_factory=list)


class UpdateRejected(_SessionEvent, frozen=True, kw_only=True, tag="UpdateRejected"):
    """fedavg: an update named by ``RoundClosed`` that no peer applies (wrong tensors, NaN/Inf, bad hash)."""

    round: int
    peer_id: str
    reason: str
    reported_by: str


class RoundAveraged(_SessionEvent, frozen=True, kw_only=True, tag="RoundAveraged"):
    """fedavg: the weighted average of a closed round, stored at ``uri`` (identical on every peer)."""

    round: int
    uri: str
    sha256: str
    peer_id: str
    val_loss: float | None = None
    val_accuracy: float | None = None
    """The averaged model on the whole validation split."""


class ShardReassigned(_SessionEvent, frozen=True, kw_only=True, tag="ShardReassigned"):
    """fedavg: a failed participant's shard handed to an idle peer, from round ``round`` on."""

    shard: int
    from_peer_id: str
    to_peer_id: str
    round: int


class PeerFailed(_SessionEvent, frozen=True, kw_only=True, tag="PeerFailed"):
    peer_id: str
    reason: str


class SessionCompleted(_SessionEvent, frozen=True, kw_only=True, tag="SessionCompleted"):
    best_peer_id: str
    best_val_accuracy: float | None
    model_uri: str
    checked_val_accuracy: float | None = None
    """The best model's validation accuracy as a service measured it (``ModelEvaluated``), beside
    the peer's own claim in ``best_val_accuracy``; None where nothing re-evaluated it."""


class ModelEvaluated(_SessionEvent, frozen=True, kw_only=True, tag="ModelEvaluated"):
    """A peer's finished model, re-evaluated by the scheduler on the session's validation split
    (the peer's claim is not believed). ``val_accuracy`` None: it could not be evaluated (its bytes
    differ from the sha256 of its ``PeerDone``, it does not load or does not fit the data), and
    ``reason`` says why; such a model never wins."""

    peer_id: str
    val_loss: float | None = None
    val_accuracy: float | None = None
    model_sha256: str
    reason: str | None = None


class SessionFailed(_SessionEvent, frozen=True, kw_only=True, tag="SessionFailed"):
    reason: str


class SessionCancelled(_SessionEvent, frozen=True, kw_only=True, tag="SessionCancelled"):
    reason: str = "cancelled by its owner"


class ReportRejected(_PeerEvent, frozen=True, kw_only=True, tag="ReportRejected"):
    """A peer's report that the scheduler refused to turn into a fact, and why (not assigned, round
    not open, a value out of bounds, a URI it was not handed, a sample count that disagrees with
    its shard ...). Stored on the reporting peer's own subject."""

    session_id: str | None = None
    report_type: str
    report_id: str
    reason: str


Event = (
    UserRegistered
    | DatasetUploaded
    | PeerRegistered
    | PeerWentOnline
    | PeerWentOffline
    | PeerLocked
    | PeerReleased
    | ReportRejected
    | SessionRequested
    | SessionStarted
    | Heartbeat
    | PeerDone
    | PeerFailed
    | ModelUpdatePublished
    | RoundClosed
    | UpdateRejected
    | RoundAveraged
    | ShardReassigned
    | ModelEvaluated
    | SessionCompleted
    | SessionFailed
    | SessionCancelled
)
SessionEvent = (
    SessionRequested
    | SessionStarted
    | Heartbeat
    | PeerDone
    | PeerFailed
    | ModelUpdatePublished
    | RoundClosed
    | UpdateRejected
    | RoundAveraged
    | ShardReassigned
    | ModelEvaluated
    | SessionCompleted
    | SessionFailed
    | SessionCancelled
)
TERMINAL_SESSION_EVENTS = (SessionCompleted, SessionFailed, SessionCancelled)
Report = PeerRegistered | Heartbeat | ModelUpdatePublished | PeerDone | PeerFailed | UpdateRejected | RoundAveraged
"""What a peer may say, on ``peer.<its id>.reports`` only: claims that the scheduler checks against
what it knows before it appends the same message as a fact, or a ``ReportRejected``."""


# ------------------------------------------------------------------ commands (peer.<id>.command)


class _Command(_Message, frozen=True, kw_only=True):
    peer_id: str

    @property
    def subject(self) -> str:
        return subjects.peer_command(self.peer_id)


class Train(_Command, frozen=True, kw_only=True, tag="Train"):
    session_id: str
    dataset_uri: str
    dataset_sha256: str
    label_column: LabelColumn
    model: ModelSpec
    hyperparameters: Hyperparameters
    validation_split: ValidationSplit
    seed: Seed
    output_uri: str
    strategy: Strategy = SWEEP
    shard: int = 0
    num_shards: int = 1
    rounds: Rounds = 1
    start_round: int = 1
    """fedavg: the first round this peer trains; it starts from the average of the round before."""
    rounds_uri: str = ""
    """fedavg: updates go to ``<rounds_uri>/<round>/<peer_id>.safetensors``, averages to
    ``<rounds_uri>/<round>/average.safetensors``."""
    # Object-scoped, expiring URLs (``swarmtrain.common.signing``): what the peer may read and
    # write, so that it holds no storage credentials. The ``*_uri`` fields above stay the names of
    # the objects, which the peer reports back and the scheduler checks.
    dataset_url: str = ""
    """Signed GET of the dataset."""
    output_url: str = ""
    """Signed PUT of this peer's model (``output_uri``)."""
    update_urls: dict[int, str] = msgspec.field(default_factory=dict)
    """fedavg: round -> signed PUT of this peer's update for that round."""
    average_urls: dict[int, str] = msgspec.field(default_factory=dict)
    """fedavg: round -> signed PUT of that round's average."""


class Stop(_Command, frozen=True, kw_only=True, tag="Stop"):
    session_id: str


class SessionFact(_Command, frozen=True, kw_only=True, tag="SessionFact"):
    """A fact of a session the peer is assigned to, forwarded by the scheduler: a peer reads no
    session's events itself. ``urls`` maps each object the fact names (an update's or average's
    ``uri``) to a signed GET URL the peer may fetch it with."""

    session_id: str
    fact: SessionEvent
    urls: dict[str, str] = msgspec.field(default_factory=dict)


Command = Train | Stop | SessionFact


# ------------------------------------------------------------------ presence (plain NATS, not stored)


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    peer_id: str
    name: str
    device: str
    session_id: str | None = None
    """The session whose job the peer is working on, if any."""
    train_id: str | None = None
    """The ``event_id`` of the ``Train`` it is working on: the scheduler compares it with its locks
    and re-sends a ``Train`` that no beat shows being worked on."""

    @property
    def subject(self) -> str:
        return subjects.peer_presence(self.peer_id)


PRESENCE_SUBJECTS = subjects.PEER_PRESENCE

_event_decoder = msgspec.json.Decoder(Event)
_command_decoder = msgspec.json.Decoder(Command)
_presence_decoder = msgspec.json.Decoder(Presence)
_report_decoder = msgspec.json.Decoder(Report)
_encoder = msgspec.json.Encoder()


def encode(message: Event | Command | Presence) -> bytes:
    return _encoder.encode(message)


def decode_event(data: bytes) -> Event:
    """Raises ``msgspec.ValidationError`` or ``msgspec.DecodeError`` for a malformed message."""
    event: Event = _event_decoder.decode(data)
    return event


def decode_command(data: bytes) -> Command:
    command: Command = _command_decoder.decode(data)
    return command


def decode_report(data: bytes) -> Report:
    report: Report = _report_decoder.decode(data)
    return report


def decode_presence(data: bytes) -> Presence:
    presence: Presence = _presence_decoder.decode(data)
    return presence


def to_builtins(message: Any) -> Any:
    return msgspec.to_builtins(message)
