"""The scheduler's decisions: ``decide(state, clocks, config)`` says everything to do now.

Pure: it reads the state and the clocks passed in, never changes the state, and returns every
action with all its data (the events and commands in full, their ids derived from what caused
them, their times from ``clocks``). Decisions are level-triggered: they derive from the state
alone, so a restarted scheduler that replays the log reaches the same decisions, with the same
ids, and JetStream drops what was published already. What is particular to a strategy (who trains
what, rounds, a failed participant, the session's model) is asked of ``strategies``.
"""

from __future__ import annotations

from collections.abc import Sequence

from swarmtrain.common.events import PeerWentOffline, PeerWentOnline, SessionCompleted, SessionStarted
from swarmtrain.scheduler.actions import (
    Action,
    Append,
    Clocks,
    Config,
    Reassign,
    Send,
    Start,
    digest,
    lock,
    peer_failed,
    release,
    session_failed,
    stop,
    train_command,
)
from swarmtrain.scheduler.state import Peer, Session, State
from swarmtrain.scheduler.strategies import strategy_of


def decide(state: State, clocks: Clocks, config: Config) -> list[Action]:
    """Everything the scheduler should do now, given the state and the clocks."""
    actions: list[Action] = _presence(state, clocks, config.timing.peer_timeout)
    unavailable = {a.event.peer_id for a in actions if isinstance(a, Append) and isinstance(a.event, PeerWentOffline)}
    idle = sorted(
        (p for p in state.peers.values() if p.online and p.session_id is None and p.peer_id not in unavailable),
        key=lambda p: p.peer_id,
    )
    for session in state.sessions.values():
        if session.status != "running":
            continue
        step = strategy_of(session.request.strategy).step(session, idle, clocks, config)
        taken = {a.peer_id for a in step if isinstance(a, Reassign)}
        if taken:
            idle = [p for p in idle if p.peer_id not in taken]
        actions += step
    locked: dict[str, list[Peer]] = {}  # one pass over the peers, not one per session
    for peer in state.peers.values():
        if peer.session_id is not None:
            locked.setdefault(peer.session_id, []).append(peer)
    for session in state.sessions.values():
        actions += _finish(session, locked.get(session.session_id, []), clocks)
    actions += _schedule(state, idle, clocks, config)
    return actions


def _presence(state: State, clocks: Clocks, timeout: float) -> list[Action]:
    now = clocks.now
    actions: list[Action] = []
    for peer_id, beat in state.beats.items():
        peer = state.peers.get(peer_id)
        if now - beat <= timeout and (peer is None or not peer.online):
            seq = 0 if peer is None else peer.seq
            actions.append(
                Append(PeerWentOnline(event_id=f"{peer_id}.online.{seq}", occurred_at=clocks.at, peer_id=peer_id))
            )
    for peer in state.peers.values():
        last = state.beats.get(peer.peer_id, state.started_at)
        if not peer.online or now - last <= timeout:
            continue
        offline = PeerWentOffline(
            event_id=f"{peer.peer_id}.offline.{peer.seq}", occurred_at=clocks.at, peer_id=peer.peer_id
        )
        actions.append(Append(offline))
        session = state.sessions.get(peer.session_id or "")
        if session is not None and session.status == "running" and session.training(peer.peer_id):
            reason = f"peer went offline: no presence beat for {now - last:.1f}s"
            actions.append(peer_failed(session.session_id, peer.peer_id, reason, clocks))
    return actions


def _finish(session: Session, locked: list[Peer], clocks: Clocks) -> list[Action]:
    """Complete or fail a session whose runs have all ended; stop and free the peers of ended runs
    (``locked``: the peers whose lock names the session)."""
    sid = session.session_id
    all_ended = session.runs and all(r.status != "training" for r in session.runs.values())
    if session.status == "running" and all_ended and not session.rounds_open:
        best = strategy_of(session.request.strategy).model(session)
        if best is None:
            return [session_failed(sid, "every peer failed", clocks)]
        model = session.runs[best]
        completed = SessionCompleted(
            event_id=f"{sid}.completed",
            occurred_at=clocks.at,
            session_id=sid,
            best_peer_id=best,
            best_val_accuracy=model.val_accuracy,
            model_uri=model.model_uri or "",
        )
        return [Append(completed)]  # the peers are released once the terminal event is back in the state
    actions: list[Action] = []
    for peer in locked:
        run = session.runs.get(peer.peer_id)
        if session.status == "queued" or run is None or run.status == "training":
            continue  # locks of a start or reassignment in progress, or a peer still at work
        if run.status in ("failed", "stopped"):  # it may still be at work: tell it to stop
            actions.append(Send(stop(sid, peer.peer_id, peer.lock_seq, clocks)))
        actions.append(Append(release(sid, peer.peer_id, peer.lock_seq, clocks)))
    return actions


def _schedule(state: State, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
    """First fit, oldest request first: start every queued session that enough idle peers can take."""
    actions: list[Action] = []
    free = list(idle)
    for session in sorted(state.sessions.values(), key=lambda s: s.seq):
        if session.status != "queued":
            continue
        need = session.request.num_peers
        if len(free) >= need:
            actions.append(start(session, free[:need], clocks, config))
            del free[:need]
    return actions


def start(session: Session, peers: Sequence[Peer], clocks: Clocks, config: Config) -> Start:
    """Start ``session`` on ``peers``: their locks, the start with the strategy's assignment, the Trains."""
    req, sid = session.request, session.session_id
    peer_ids = [p.peer_id for p in peers]
    assignment = strategy_of(req.strategy).assign(req, peer_ids)
    # the id names the whole decision: two schedulers that pick different peers never share one
    cause = digest(sid, session.seq, *(f"{p.peer_id}@{p.seq}" for p in peers))
    started = SessionStarted(
        event_id=f"{sid}.started.{cause}",
        occurred_at=clocks.at,
        session_id=sid,
        assignments=assignment.hyperparameters,
        shards=assignment.shards,
    )
    trains = tuple(
        train_command(req, p, hp, assignment.shards.get(p, 0), 1, clocks, config.uri)
        for p, hp in assignment.hyperparameters.items()
    )
    locks = tuple(lock(sid, p.peer_id, p.seq, cause, clocks) for p in peers)
    return Start(session_id=sid, locks=locks, started=started, expected=session.seq, trains=trains)


def recover(state: State, clocks: Clocks, config: Config) -> list[Action]:
    """At start-up, once the log is replayed: re-send the ``Train`` of every run not seen at work
    (it may never have got it; the same id, so one that did is not sent twice), and release the
    locks that no start or reassignment completed (a scheduler died half-way)."""
    actions: list[Action] = []
    for session in state.sessions.values():
        if session.status != "running":
            continue
        for peer_id, run in session.runs.items():
            if run.status == "training" and run.epoch == 0:
                start_round = max(1, session.round)
                train = train_command(
                    session.request, peer_id, run.hyperparameters, run.shard, start_round, clocks, config.uri
                )
                actions.append(Send(train))
    for peer in state.peers.values():
        stale = state.sessions.get(peer.session_id or "")
        if stale is None or peer.session_id is None:
            continue
        if stale.status == "queued" or (stale.status == "running" and peer.peer_id not in stale.runs):
            actions.append(Append(release(peer.session_id, peer.peer_id, peer.lock_seq, clocks)))
    return actions
