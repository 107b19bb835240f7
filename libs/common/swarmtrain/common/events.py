"""The event and command contract: msgspec Structs, one tagged union each, JSON on the wire.

Every message is frozen and keyword-only, tagged by its class name in the field ``type`` (the tag
is spelled out so that renaming a class never breaks stored history). Evolve only by adding fields
with defaults; a breaking change is a new type plus an upcaster.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Hyperparameters(msgspec.Struct, frozen=True, kw_only=True):
    epochs: int
    batch_size: int
    lr: float


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["mlp"] = "mlp"
    hidden: list[int] = msgspec.field(default_factory=lambda: [128, 64])


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
        return f"user.{self.user_id}.events"


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
    label_column: str

    @property
    def subject(self) -> str:
        return f"dataset.{self.dataset_id}.events"


# ------------------------------------------------------------------ peers


class _PeerEvent(_Message, frozen=True, kw_only=True):
    peer_id: str

    @property
    def subject(self) -> str:
        return f"peer.{self.peer_id}.events"


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
        return f"session.{self.session_id}.events"


class SessionRequested(_SessionEvent, frozen=True, kw_only=True, tag="SessionRequested"):
    owner_id: str
    dataset_id: str
    dataset_uri: str
    dataset_sha256: str
    label_column: str
    num_peers: int
    strategy: Literal["sweep"] = "sweep"
    model: ModelSpec
    hyperparameters: list[Hyperparameters]
    validation_split: float = 0.2
    seed: int = 0


class SessionStarted(_SessionEvent, frozen=True, kw_only=True, tag="SessionStarted"):
    assignments: dict[str, Hyperparameters]


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


class PeerFailed(_SessionEvent, frozen=True, kw_only=True, tag="PeerFailed"):
    peer_id: str
    reason: str


class SessionCompleted(_SessionEvent, frozen=True, kw_only=True, tag="SessionCompleted"):
    best_peer_id: str
    best_val_accuracy: float | None
    model_uri: str


class SessionFailed(_SessionEvent, frozen=True, kw_only=True, tag="SessionFailed"):
    reason: str


class SessionCancelled(_SessionEvent, frozen=True, kw_only=True, tag="SessionCancelled"):
    reason: str = "cancelled by its owner"


Event = (
    UserRegistered
    | DatasetUploaded
    | PeerRegistered
    | PeerWentOnline
    | PeerWentOffline
    | PeerLocked
    | PeerReleased
    | SessionRequested
    | SessionStarted
    | Heartbeat
    | PeerDone
    | PeerFailed
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
    | SessionCompleted
    | SessionFailed
    | SessionCancelled
)
TERMINAL_SESSION_EVENTS = (SessionCompleted, SessionFailed, SessionCancelled)


# ------------------------------------------------------------------ commands (peer.<id>.command)


class _Command(_Message, frozen=True, kw_only=True):
    peer_id: str

    @property
    def subject(self) -> str:
        return f"peer.{self.peer_id}.command"


class Train(_Command, frozen=True, kw_only=True, tag="Train"):
    session_id: str
    dataset_uri: str
    dataset_sha256: str
    label_column: str
    model: ModelSpec
    hyperparameters: Hyperparameters
    validation_split: float
    seed: int
    output_uri: str


class Stop(_Command, frozen=True, kw_only=True, tag="Stop"):
    session_id: str


Command = Train | Stop


# ------------------------------------------------------------------ presence (plain NATS, not stored)


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    peer_id: str
    name: str
    device: str
    session_id: str | None = None

    @property
    def subject(self) -> str:
        return f"peer.{self.peer_id}.presence"


PRESENCE_SUBJECTS = "peer.*.presence"

_event_decoder = msgspec.json.Decoder(Event)
_command_decoder = msgspec.json.Decoder(Command)
_presence_decoder = msgspec.json.Decoder(Presence)
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


def decode_presence(data: bytes) -> Presence:
    presence: Presence = _presence_decoder.decode(data)
    return presence


def to_builtins(message: Any) -> Any:
    return msgspec.to_builtins(message)
