"""The scheduler's state machine: ``evolve`` folds events into state, ``decide`` says what to do next.

No I/O here. The shell (service.py) feeds every event of the EVENTS stream to ``evolve`` with its
stream sequence, presence beats to ``observe_presence``, and after it has caught up with its own
writes asks ``decide`` for the next actions. Decisions are level-triggered: they are derived from
the state alone, so a restarted scheduler that replays the log reaches the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    PeerDone,
    PeerFailed,
    PeerLocked,
    PeerRegistered,
    PeerReleased,
    PeerWentOffline,
    PeerWentOnline,
    Presence,
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionRequested,
    SessionStarted,
    Stop,
)

RunStatus = Literal["training", "done", "failed"]
SessionStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


@dataclass
class Peer:
    peer_id: str
    name: str = ""
    device: str = ""
    online: bool = False
    session_id: str | None = None
    seq: int = 0
    """Stream sequence of the last event on ``peer.<id>.events``: the lock's compare-and-set."""


@dataclass
class Run:
    """One peer's part in a session."""

    hyperparameters: Hyperparameters
    status: RunStatus = "training"
    epoch: int = 0
    val_accuracy: float | None = None
    model_uri: str | None = None


@dataclass
class Session:
    request: SessionRequested
    status: SessionStatus = "queued"
    seq: int = 0
    """Stream sequence of the last event on ``session.<id>.events``: the start's compare-and-set."""
    runs: dict[str, Run] = field(default_factory=dict)


@dataclass
class State:
    peers: dict[str, Peer] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    beats: dict[str, float] = field(default_factory=dict)
    """peer_id -> monotonic time of its last presence beat (not stored in the log)."""
    position: int = 0
    started_at: float = 0.0


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Append:
    event: Event


@dataclass(frozen=True)
class Send:
    command: Stop


@dataclass(frozen=True)
class Start:
    """Lock ``peer_ids`` (compare-and-set on each peer subject), then start the session
    (compare-and-set on the session subject), then send each peer its ``Train``. Any failed
    compare-and-set releases what this attempt locked; the next decision retries."""

    session_id: str
    peer_ids: tuple[str, ...]


Action = Append | Send | Start


# ------------------------------------------------------------------ evolve


def _peer(state: State, peer_id: str) -> Peer:
    return state.peers.setdefault(peer_id, Peer(peer_id=peer_id))


def evolve(state: State, seq: int, event: Event) -> State:
    state.position = max(state.position, seq)
    match event:
        case PeerRegistered():
            peer = _peer(state, event.peer_id)
            peer.name, peer.device, peer.seq = event.name, event.device, seq
        case PeerWentOnline():
            peer = _peer(state, event.peer_id)
            peer.online, peer.seq = True, seq
        case PeerWentOffline():
            peer = _peer(state, event.peer_id)
            peer.online, peer.seq = False, seq
        case PeerLocked():
            peer = _peer(state, event.peer_id)
            peer.session_id, peer.seq = event.session_id, seq
        case PeerReleased():
            peer = _peer(state, event.peer_id)
            peer.seq = seq
            if peer.session_id == event.session_id:
                peer.session_id = None
        case SessionRequested():
            state.sessions.setdefault(event.session_id, Session(request=event, seq=seq))
        case _:
            if (session := _session_of(state, event)) is not None:
                _evolve_session(session, seq, event)
    return state


def _evolve_session(session: Session, seq: int, event: Event) -> None:
    session.seq = seq
    match event:
        case SessionStarted():
            if session.status == "queued":
                session.status = "running"
                session.runs = {p: Run(hyperparameters=h) for p, h in event.assignments.items()}
        case Heartbeat():
            if (run := session.runs.get(event.peer_id)) is not None and run.status == "training":
                run.epoch, run.val_accuracy = event.epoch, event.val_accuracy
        case PeerDone():
            if (run := session.runs.get(event.peer_id)) is not None and run.status == "training":
                run.status, run.epoch = "done", event.epochs
                run.val_accuracy, run.model_uri = event.val_accuracy, event.model_uri
        case PeerFailed():
            if (run := session.runs.get(event.peer_id)) is not None and run.status == "training":
                run.status = "failed"
        case SessionCompleted() | SessionFailed() | SessionCancelled():
            if session.status not in TERMINAL:
                session.status = {
                    SessionCompleted: "completed",
                    SessionFailed: "failed",
                    SessionCancelled: "cancelled",
                }[type(event)]  # type: ignore[assignment]


def _session_of(state: State, event: Event) -> Session | None:
    session_id = getattr(event, "session_id", None)
    return state.sessions.get(session_id) if isinstance(session_id, str) else None


def observe_presence(state: State, presence: Presence, now: float) -> State:
    state.beats[presence.peer_id] = now
    return state


# ------------------------------------------------------------------ decide


def decide(state: State, now: float, peer_timeout: float) -> list[Action]:
    """Everything the scheduler should do now, given the state and the clock."""
    actions: list[Action] = []
    actions += _presence(state, now, peer_timeout)
    going_offline = {a.event.peer_id for a in actions if isinstance(a.event, PeerWentOffline)}  # type: ignore[union-attr]
    for session in state.sessions.values():
        actions += _finish(state, session)
    actions += _schedule(state, going_offline)
    return actions


def _presence(state: State, now: float, timeout: float) -> list[Action]:
    actions: list[Action] = []
    for peer_id, beat in state.beats.items():
        if now - beat <= timeout and not _peer(state, peer_id).online:
            actions.append(Append(PeerWentOnline(peer_id=peer_id)))
    for peer in state.peers.values():
        last = state.beats.get(peer.peer_id, state.started_at)
        if not peer.online or now - last <= timeout:
            continue
        actions.append(Append(PeerWentOffline(peer_id=peer.peer_id)))
        session = state.sessions.get(peer.session_id or "")
        if session is not None and session.status == "running":
            run = session.runs.get(peer.peer_id)
            if run is not None and run.status == "training":
                reason = f"peer went offline: no presence beat for {now - last:.1f}s"
                actions.append(
                    Append(PeerFailed(session_id=session.request.session_id, peer_id=peer.peer_id, reason=reason))
                )
    return actions


def _finish(state: State, session: Session) -> list[Action]:
    """Complete or fail a running session whose runs have all ended; free the peers of ended runs."""
    sid = session.request.session_id
    actions: list[Action] = []
    if session.status == "running" and session.runs and all(r.status != "training" for r in session.runs.values()):
        done = {p: r for p, r in session.runs.items() if r.status == "done" and r.model_uri}
        if done:
            best = max(done, key=lambda p: (done[p].val_accuracy or float("-inf"), p))
            actions.append(
                Append(
                    SessionCompleted(
                        event_id=f"{sid}.completed",
                        session_id=sid,
                        best_peer_id=best,
                        best_val_accuracy=done[best].val_accuracy,
                        model_uri=done[best].model_uri or "",
                    )
                )
            )
        else:
            actions.append(Append(SessionFailed(event_id=f"{sid}.failed", session_id=sid, reason="every peer failed")))
        return actions  # the peers are released once the terminal event is back in the state
    for peer in state.peers.values():
        if peer.session_id != sid:
            continue
        run = session.runs.get(peer.peer_id)
        if session.status in TERMINAL:
            if run is not None and run.status == "training":
                actions.append(Send(Stop(event_id=f"{sid}.{peer.peer_id}.stop", peer_id=peer.peer_id, session_id=sid)))
        elif session.status != "running" or run is None or run.status == "training":
            continue  # queued: locks are the start protocol's business; training: still at work
        actions.append(
            Append(PeerReleased(event_id=f"{sid}.{peer.peer_id}.released", peer_id=peer.peer_id, session_id=sid))
        )
    return actions


def _schedule(state: State, going_offline: set[str]) -> list[Action]:
    """First fit, oldest request first: start every queued session that enough idle peers can take."""
    idle = sorted(
        p.peer_id for p in state.peers.values() if p.online and p.session_id is None and p.peer_id not in going_offline
    )
    actions: list[Action] = []
    for session in sorted(state.sessions.values(), key=lambda s: s.seq):
        if session.status != "queued":
            continue
        need = session.request.num_peers
        if len(idle) >= need:
            actions.append(Start(session_id=session.request.session_id, peer_ids=tuple(idle[:need])))
            idle = idle[need:]
    return actions


def stale_locks(state: State) -> list[Action]:
    """At start-up: locks held for sessions that never started (a scheduler died mid-start)."""
    return [
        Append(PeerReleased(peer_id=p.peer_id, session_id=p.session_id))
        for p in state.peers.values()
        if p.session_id is not None and (s := state.sessions.get(p.session_id)) is not None and s.status == "queued"
    ]
