"""What ``decide`` needs (clocks, timing, where blobs go) and what it returns (actions, with every
event and command in full). Every id here derives from what caused it, and every time from the
clocks passed in, so deciding twice on equal inputs gives equal actions, and a retried or repeated
decision is deduplicated by JetStream (``Nats-Msg-Id``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from swarmtrain.common.events import (
    Event,
    Hyperparameters,
    PeerFailed,
    PeerLocked,
    PeerReleased,
    SessionFailed,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    Stop,
    Train,
)


@dataclass(frozen=True)
class Clocks:
    now: float
    """Monotonic seconds: presence beats, which are not in the log."""
    wall: float
    """UTC seconds: round deadlines (against the broker's ``observed_at`` of events) and ``occurred_at``."""

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


UriFor = Callable[[str], str]
"""Blob key -> the URI a peer reads or writes it at (the blob store's ``uri``)."""


@dataclass(frozen=True)
class Config:
    """What the scheduler's decisions depend on besides the state and the clocks."""

    uri: UriFor
    timing: Timing = Timing()


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Append:
    event: Event


@dataclass(frozen=True)
class Send:
    command: Train | Stop


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


Action = Append | Send | Start | Reassign


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


def peer_failed(session_id: str, peer_id: str, reason: str, clocks: Clocks) -> Append:
    """A run's failure: one per run (a peer has at most one run a session)."""
    event = PeerFailed(
        event_id=f"{session_id}.{peer_id}.failed",
        occurred_at=clocks.at,
        session_id=session_id,
        peer_id=peer_id,
        reason=reason,
    )
    return Append(event)


def session_failed(session_id: str, reason: str, clocks: Clocks) -> Append:
    return Append(
        SessionFailed(event_id=f"{session_id}.failed", occurred_at=clocks.at, session_id=session_id, reason=reason)
    )


def train_command(
    req: SessionRequested,
    peer_id: str,
    hyperparameters: Hyperparameters,
    shard: int,
    start_round: int,
    clocks: Clocks,
    uri: UriFor,
) -> Train:
    sid = req.session_id
    return Train(
        event_id=f"{sid}.{peer_id}.train.{start_round}",
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
        output_uri=uri(f"sessions/{sid}/models/{peer_id}.safetensors"),
        strategy=req.strategy,
        shard=shard,
        num_shards=req.num_peers,
        rounds=req.rounds,
        start_round=start_round,
        rounds_uri=uri(f"sessions/{sid}/rounds"),
    )
