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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    ModelUpdatePublished,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOffline,
    PeerWentOnline,
    Presence,
    RoundClosed,
    RoundUpdate,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
)
from swarmtrain.common.lifecycle import ends_session, run_after, session_after, starts_session, takes_new_runs
from swarmtrain.common.status import RunStatus, SessionStatus
from swarmtrain.scheduler.strategies import strategy_of


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


@dataclass(frozen=True)
class Session:
    request: SessionRequested
    status: SessionStatus = "queued"
    seq: int = 0
    """Stream sequence of the last event on ``session.<id>.events``: the start's compare-and-set."""
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

    @property
    def session_id(self) -> str:
        return self.request.session_id

    @property
    def rounds_open(self) -> bool:
        return 1 <= self.round <= self.request.rounds

    def training(self, peer_id: str) -> Run | None:
        """``peer_id``'s run if it is still training."""
        run = self.runs.get(peer_id)
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
    position: int = 0
    started_at: float = 0.0
    """Monotonic time the scheduler started: a peer known from the log gets its grace period from here."""


# ------------------------------------------------------------------ fold


def evolve(state: State, seq: int, event: Event, observed_at: float) -> State:
    """``state`` with ``event`` (stream sequence ``seq``, stored at ``observed_at``) applied."""
    return fold(state, ((seq, event, observed_at),))


def fold(state: State, items: Iterable[tuple[int, Event, float]]) -> State:
    """``state`` with every ``(seq, event, observed_at)`` applied in order."""
    peers: dict[str, Peer] | None = None  # copied on the batch's first change
    sessions: dict[str, Session] | None = None
    position = state.position
    for seq, event, observed_at in items:
        position = max(position, seq)
        match event:
            case PeerRegistered() | PeerWentOnline() | PeerWentOffline() | PeerLocked() | PeerReleased():
                if peers is None:
                    peers = dict(state.peers)
                peers[event.peer_id] = _evolve_peer(peers.get(event.peer_id), seq, event)
            case SessionRequested():
                known = (state.sessions if sessions is None else sessions).get(event.session_id)
                if sessions is None:
                    sessions = dict(state.sessions)
                sessions[event.session_id] = (
                    Session(request=event, seq=seq) if known is None else replace(known, seq=seq)
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
        position=position,
    )


def _evolve_peer(
    peer: Peer | None, seq: int, event: PeerRegistered | PeerWentOnline | PeerWentOffline | PeerLocked | PeerReleased
) -> Peer:
    peer = Peer(peer_id=event.peer_id) if peer is None else peer
    match event:
        case PeerRegistered():
            return replace(peer, name=event.name, device=event.device, seq=seq)
        case PeerWentOnline():
            return replace(peer, online=True, seq=seq)
        case PeerWentOffline():
            return replace(peer, online=False, seq=seq)
        case PeerLocked():
            return replace(peer, session_id=event.session_id, seq=seq, lock_seq=seq)
        case PeerReleased():
            freed = peer.session_id == event.session_id
            return replace(peer, session_id=None if freed else peer.session_id, seq=seq)


def _evolve_session(session: Session, seq: int, event: Event, wall: float) -> Session:
    session = replace(session, seq=seq)
    status = session_after(session.status, event)
    match event:
        case SessionStarted():
            if starts_session(session.status, event):
                runs = {p: Run(hyperparameters=h, shard=event.shards.get(p, 0)) for p, h in event.assignments.items()}
                session = replace(session, status=status, runs=runs)
                if strategy_of(session.request.strategy).rounds:
                    session = replace(session, round=1, round_opened=wall, round_base=wall)
            return session
        case Heartbeat():
            if (run := session.training(event.peer_id)) is not None:
                return _with_run(
                    session, event.peer_id, replace(run, epoch=event.epoch, val_accuracy=event.val_accuracy)
                )
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
                    longest_round=max(session.longest_round, wall - session.round_opened),
                    round=event.round + 1,
                    round_opened=wall,
                    round_base=wall,
                    first_update=None,
                    updates={},
                )
        case ShardReassigned():
            if takes_new_runs(session.status) and event.to_peer_id not in session.runs:
                run = Run(hyperparameters=session.request.hyperparameters[event.shard], shard=event.shard)
                return replace(_with_run(session, event.to_peer_id, run), round_base=max(session.round_base, wall))
        case PeerDone():
            if (run := session.training(event.peer_id)) is not None:
                done = replace(
                    run,
                    status=run_after(run.status, event),
                    epoch=event.epochs,
                    val_accuracy=event.val_accuracy,
                    model_uri=event.model_uri,
                    model_sha256=event.model_sha256,
                )
                return _with_run(session, event.peer_id, done)
        case PeerFailed():
            if (run := session.training(event.peer_id)) is not None:
                return _with_run(session, event.peer_id, replace(run, status=run_after(run.status, event)))
        case _:
            if ends_session(session.status, event):
                runs = {p: replace(r, status=run_after(r.status, event)) for p, r in session.runs.items()}
                return replace(session, status=status, runs=runs)
    return session


def _with_run(session: Session, peer_id: str, run: Run) -> Session:
    return replace(session, runs={**session.runs, peer_id: run})


def observe_presence(state: State, presence: Presence, now: float) -> State:
    """``state`` with ``presence``'s beat seen at monotonic time ``now``."""
    return observe_beats(state, {presence.peer_id: now})


def observe_beats(state: State, beats: Mapping[str, float]) -> State:
    """``state`` with several beats (peer_id -> monotonic time) seen at once."""
    return replace(state, beats={**state.beats, **beats}) if beats else state
