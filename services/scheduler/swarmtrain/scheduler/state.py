"""The scheduler's state machine: ``evolve`` folds events into state, ``decide`` says what to do next.

No I/O here. The shell (service.py) feeds every event of the EVENTS stream to ``evolve`` with its
stream sequence, presence beats to ``observe_presence``, and after it has caught up with its own
writes asks ``decide`` for the next actions. Decisions are level-triggered: they are derived from
the state alone, so a restarted scheduler that replays the log reaches the same decisions.

Two clocks come in: ``now`` (monotonic, for presence beats, which are not in the log) and ``wall``
(UTC seconds, compared with events' ``occurred_at`` for fedavg round deadlines, which survive a
restart because they come from the log).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
    SessionCancelled,
    SessionCompleted,
    SessionFailed,
    SessionRequested,
    SessionStarted,
    ShardReassigned,
    Stop,
)
from swarmtrain.common.status import SESSION_TERMINAL, RunStatus, SessionStatus

TERMINAL = SESSION_TERMINAL


@dataclass(frozen=True)
class Timing:
    peer_timeout: float = 6.0
    """Silence after which a peer is offline."""
    first_round_timeout: float = 600.0
    """fedavg: a round's deadline while nothing is known about how long rounds take."""
    round_factor: float = 3.0
    """fedavg: deadline = this x the longest round (or first update) seen so far ..."""
    round_min: float = 10.0
    """... but never less than this many seconds."""


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
    model_sha256: str | None = None
    shard: int = 0


@dataclass
class Session:
    request: SessionRequested
    status: SessionStatus = "queued"
    seq: int = 0
    """Stream sequence of the last event on ``session.<id>.events``: the start's compare-and-set."""
    runs: dict[str, Run] = field(default_factory=dict)
    # fedavg rounds
    round: int = 0
    """The open round (1-based); ``rounds + 1`` once the last one closed."""
    round_opened: float = 0.0
    """Wall time the open round opened."""
    round_base: float = 0.0
    """Wall time the open round's deadline counts from: its opening, or its latest reassignment."""
    first_update: float | None = None
    """Wall time of the open round's first update."""
    longest_round: float = 0.0
    updates: dict[str, RoundUpdate] = field(default_factory=dict)
    """The open round's updates by peer."""

    @property
    def fedavg(self) -> bool:
        return self.request.strategy == "fedavg"

    @property
    def rounds_open(self) -> bool:
        return self.fedavg and 1 <= self.round <= self.request.rounds

    def orphan_shards(self) -> list[int]:
        """Shards whose peer failed and that no training peer holds."""
        held = {r.shard for r in self.runs.values() if r.status == "training"}
        return sorted({r.shard for r in self.runs.values() if r.status == "failed"} - held)


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


@dataclass(frozen=True)
class Reassign:
    """fedavg: lock ``peer_id`` (compare-and-set), append ``ShardReassigned``, send its ``Train``
    for ``shard`` from round ``round`` on."""

    session_id: str
    shard: int
    from_peer_id: str
    peer_id: str
    round: int


Action = Append | Send | Start | Reassign


# ------------------------------------------------------------------ evolve


def _peer(state: State, peer_id: str) -> Peer:
    peer = state.peers.get(peer_id)
    if peer is None:
        peer = state.peers[peer_id] = Peer(peer_id=peer_id)
    return peer


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
    wall = event.occurred_at.timestamp()
    match event:
        case SessionStarted():
            if session.status == "queued":
                session.status = "running"
                session.runs = {
                    p: Run(hyperparameters=h, shard=event.shards.get(p, 0)) for p, h in event.assignments.items()
                }
                if session.fedavg:
                    session.round, session.round_opened, session.round_base = 1, wall, wall
        case Heartbeat():
            if (run := _training(session, event.peer_id)) is not None:
                run.epoch, run.val_accuracy = event.epoch, event.val_accuracy
        case ModelUpdatePublished():
            # accepted only from a training participant, for the open round, once: a late or forged
            # update is ignored
            if event.round == session.round and session.rounds_open and _training(session, event.peer_id):
                if session.first_update is None:
                    session.first_update = wall
                session.updates.setdefault(
                    event.peer_id,
                    RoundUpdate(
                        peer_id=event.peer_id, uri=event.uri, sha256=event.sha256, num_samples=event.num_samples
                    ),
                )
        case RoundClosed():
            if event.round == session.round:
                session.longest_round = max(session.longest_round, wall - session.round_opened)
                session.round, session.round_opened, session.round_base = event.round + 1, wall, wall
                session.first_update, session.updates = None, {}
        case ShardReassigned():
            if session.status == "running" and event.to_peer_id not in session.runs:
                hp = session.request.hyperparameters[event.shard]
                session.runs[event.to_peer_id] = Run(hyperparameters=hp, shard=event.shard)
                session.round_base = max(session.round_base, wall)
        case PeerDone():
            if (run := _training(session, event.peer_id)) is not None:
                run.status, run.epoch = "done", event.epochs
                run.val_accuracy, run.model_uri, run.model_sha256 = (
                    event.val_accuracy,
                    event.model_uri,
                    event.model_sha256,
                )
        case PeerFailed():
            if (run := _training(session, event.peer_id)) is not None:
                run.status = "failed"
        case SessionCompleted() | SessionFailed() | SessionCancelled():
            if session.status not in TERMINAL:
                session.status = {
                    SessionCompleted: "completed",
                    SessionFailed: "failed",
                    SessionCancelled: "cancelled",
                }[type(event)]  # type: ignore[assignment]


def _training(session: Session, peer_id: str) -> Run | None:
    run = session.runs.get(peer_id)
    return run if run is not None and run.status == "training" else None


def _session_of(state: State, event: Event) -> Session | None:
    session_id = getattr(event, "session_id", None)
    return state.sessions.get(session_id) if isinstance(session_id, str) else None


def observe_presence(state: State, presence: Presence, now: float) -> State:
    state.beats[presence.peer_id] = now
    return state


# ------------------------------------------------------------------ decide


def decide(state: State, now: float, wall: float = 0.0, timing: Timing | None = None) -> list[Action]:
    """Everything the scheduler should do now, given the state and the clocks."""
    timing = timing or Timing()
    actions: list[Action] = _presence(state, now, timing.peer_timeout)
    unavailable = {a.event.peer_id for a in actions if isinstance(a, Append) and isinstance(a.event, PeerWentOffline)}
    idle = sorted(
        p.peer_id for p in state.peers.values() if p.online and p.session_id is None and p.peer_id not in unavailable
    )
    for session in state.sessions.values():
        if session.status != "running":
            continue
        closing = _rounds(session, wall, timing) if session.rounds_open else []
        actions += closing
        if not any(isinstance(a, Append) and isinstance(a.event, RoundClosed) for a in closing):
            # a shard is handed over only into a round that stays open until the newcomer publishes
            actions += _failures(session, idle)
    locked: dict[str, list[Peer]] = {}  # one pass over the peers, not one per session
    for peer in state.peers.values():
        if peer.session_id is not None:
            locked.setdefault(peer.session_id, []).append(peer)
    for session in state.sessions.values():
        actions += _finish(session, locked.get(session.request.session_id, []))
    actions += _schedule(state, idle)
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
        if session is not None and session.status == "running" and _training(session, peer.peer_id):
            reason = f"peer went offline: no presence beat for {now - last:.1f}s"
            actions.append(
                Append(PeerFailed(session_id=session.request.session_id, peer_id=peer.peer_id, reason=reason))
            )
    return actions


def round_deadline(session: Session, timing: Timing) -> float:
    """Seconds after ``round_base`` that the open round may take: adapted to the rounds seen so far."""
    seen = max(session.longest_round, (session.first_update or session.round_opened) - session.round_opened)
    if seen <= 0:
        return timing.first_round_timeout
    return max(timing.round_min, timing.round_factor * seen)


def _rounds(session: Session, wall: float, timing: Timing) -> list[Action]:
    """Close the open round once every training participant published, or at its deadline."""
    sid, r = session.request.session_id, session.round
    waiting = sorted(p for p, run in session.runs.items() if run.status == "training" and p not in session.updates)
    overdue = wall - session.round_base > round_deadline(session, timing)
    if waiting and not overdue:
        return []
    if not session.updates and not overdue:
        return []  # nobody left to wait for and nothing to average: failures decide the session's fate
    actions: list[Action] = [
        Append(PeerFailed(session_id=sid, peer_id=p, reason=f"missed the deadline of round {r}")) for p in waiting
    ]
    if session.updates:
        updates = [session.updates[p] for p in sorted(session.updates)]
        actions.append(
            Append(
                RoundClosed(event_id=f"{sid}.r{r}.closed", session_id=sid, round=r, updates=updates, left_out=waiting)
            )
        )
    return actions


def _failures(session: Session, idle: list[str]) -> list[Action]:
    """fedavg: act on participants that failed, as the session's ``on_peer_failure`` says."""
    if not session.fedavg or not session.rounds_open:
        return []
    sid = session.request.session_id
    failed = sorted(p for p, run in session.runs.items() if run.status == "failed")
    if failed and session.request.on_peer_failure == "fail":
        return [Append(SessionFailed(event_id=f"{sid}.failed", session_id=sid, reason=f"peer {failed[0]} failed"))]
    actions: list[Action] = []
    if session.request.on_peer_failure == "reassign":
        for shard in session.orphan_shards():
            # a peer that already failed in this session comes last
            candidates = sorted(idle, key=lambda p: p in session.runs)
            if not candidates:
                break
            idle.remove(chosen := candidates[0])
            previous = max(p for p, run in session.runs.items() if run.shard == shard)
            actions.append(
                Reassign(session_id=sid, shard=shard, from_peer_id=previous, peer_id=chosen, round=session.round)
            )
    if not actions and not any(run.status == "training" for run in session.runs.values()):
        actions.append(
            Append(SessionFailed(event_id=f"{sid}.failed", session_id=sid, reason="no participant left to train"))
        )
    return actions


def _finish(session: Session, locked: list[Peer]) -> list[Action]:
    """Complete or fail a session whose runs have all ended; stop and free the peers of ended runs
    (``locked``: the peers whose lock names the session)."""
    sid = session.request.session_id
    actions: list[Action] = []
    all_ended = session.runs and all(r.status != "training" for r in session.runs.values())
    if session.status == "running" and all_ended and not session.rounds_open:
        done = {p: r for p, r in session.runs.items() if r.status == "done" and r.model_uri}
        if done and session.fedavg:
            # every honest peer holds the same averaged model: take the most common one, not a
            # peer's own claim of accuracy
            votes = Counter(r.model_sha256 for r in done.values())
            agreed = min(votes, key=lambda sha: (-votes[sha], sha or ""))
            done = {p: r for p, r in done.items() if r.model_sha256 == agreed}
        if done:
            best = max(done, key=lambda p: (done[p].val_accuracy or float("-inf"), p))
            completed = SessionCompleted(
                event_id=f"{sid}.completed",
                session_id=sid,
                best_peer_id=best,
                best_val_accuracy=done[best].val_accuracy,
                model_uri=done[best].model_uri or "",
            )
            actions.append(Append(completed))
        else:
            actions.append(Append(SessionFailed(event_id=f"{sid}.failed", session_id=sid, reason="every peer failed")))
        return actions  # the peers are released once the terminal event is back in the state
    for peer in locked:
        run = session.runs.get(peer.peer_id)
        if session.status == "queued" or run is None or (session.status == "running" and run.status == "training"):
            continue  # locks of a start or reassignment in progress, or a peer still at work
        if (session.status in TERMINAL and run.status == "training") or run.status == "failed":
            actions.append(Send(Stop(event_id=f"{sid}.{peer.peer_id}.stop", peer_id=peer.peer_id, session_id=sid)))
        actions.append(
            Append(PeerReleased(event_id=f"{sid}.{peer.peer_id}.released", peer_id=peer.peer_id, session_id=sid))
        )
    return actions


def _schedule(state: State, idle: list[str]) -> list[Action]:
    """First fit, oldest request first: start every queued session that enough idle peers can take."""
    actions: list[Action] = []
    for session in sorted(state.sessions.values(), key=lambda s: s.seq):
        if session.status != "queued":
            continue
        need = session.request.num_peers
        if len(idle) >= need:
            actions.append(Start(session_id=session.request.session_id, peer_ids=tuple(idle[:need])))
            del idle[:need]
    return actions


def stale_locks(state: State) -> list[Action]:
    """At start-up: locks that no start or reassignment completed (a scheduler died half-way)."""
    actions: list[Action] = []
    for p in state.peers.values():
        session = state.sessions.get(p.session_id or "")
        if session is None or p.session_id is None:
            continue
        if session.status == "queued" or (session.status == "running" and p.peer_id not in session.runs):
            actions.append(Append(PeerReleased(peer_id=p.peer_id, session_id=p.session_id)))
    return actions
