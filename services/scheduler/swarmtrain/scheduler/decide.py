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
from dataclasses import replace

from swarmtrain.common.events import (
    PeerFailed,
    PeerReleased,
    PeerWentOffline,
    PeerWentOnline,
    SessionCompleted,
    SessionEvent,
    SessionFailed,
    SessionStarted,
    Train,
    bounded_text,
)
from swarmtrain.common.specs import QueuePolicy, Requirements
from swarmtrain.scheduler import lineage, placement, trials
from swarmtrain.scheduler.actions import (
    Action,
    Append,
    AppendIf,
    Clocks,
    Config,
    Evaluate,
    Forward,
    Prepare,
    Reassign,
    Send,
    Start,
    Timing,
    digest,
    lock,
    peer_failed,
    release,
    resend_id,
    session_failed,
    stop,
    train_command,
    train_prefix,
    trial_train,
    trial_train_id,
)
from swarmtrain.scheduler.placement import Expired, PeerView, Placement, Request
from swarmtrain.scheduler.state import Peer, Run, Session, State
from swarmtrain.scheduler.strategies import strategy_of


def decide(state: State, clocks: Clocks, config: Config) -> list[Action]:
    """Everything the scheduler should do now, given the state and the clocks."""
    clocks = replace(clocks, heard_since=max(clocks.heard_since, state.heard_since), at_work=at_work(state, clocks.now))
    actions: list[Action] = _presence(state, clocks, config.timing.peer_timeout)
    unavailable = {a.event.peer_id for a in actions if isinstance(a, Append) and isinstance(a.event, PeerWentOffline)}
    idle = sorted(
        (p for p in state.peers.values() if p.online and p.session_id is None and p.peer_id not in unavailable),
        key=lambda p: p.peer_id,
    )
    failing = {a.event.peer_id for a in actions if isinstance(a, Append) and isinstance(a.event, PeerFailed)}
    handing_over: set[str] = set()
    locked: dict[str, list[Peer]] = {}  # one pass over the peers, not one per session
    for peer in state.peers.values():
        if peer.session_id is not None:
            locked.setdefault(peer.session_id, []).append(peer)
    for session in state.sessions.values():
        if session.status != "running":
            continue
        if session.searching:
            if not locked.get(session.session_id) and not trials.done(session):
                # every peer it held went offline with trials left: nothing would ever run them
                actions.append(Append(trials.stranded(session, clocks)))
                continue
            mine = [p for p in locked.get(session.session_id, []) if p.peer_id not in unavailable | failing]
            actions += trials.step(state, session, mine, clocks, config)
            actions += resend(state, session, clocks, config, skip=unavailable | failing)
            continue
        step = strategy_of(session.request.strategy).step(session, idle, clocks, config)
        taken = {a.peer_id for a in step if isinstance(a, Reassign)}
        if taken:
            idle = [p for p in idle if p.peer_id not in taken]
            handing_over.add(session.session_id)
        failing |= {a.event.peer_id for a in step if isinstance(a, Append) and isinstance(a.event, PeerFailed)}
        actions += step
        actions += resend(state, session, clocks, config, skip=unavailable | failing)
        actions += forward(session)
    for session in state.sessions.values():
        if session.session_id in handing_over:
            continue  # a run taken over in this decision is not in the state yet: not ended
        actions += _finish(session, locked.get(session.session_id, []), clocks)
    actions += stale_locks(state, clocks, config.timing)
    actions += _schedule(state, idle, clocks, config)
    return releases_first(actions)


def releases_first(actions: list[Action]) -> list[Action]:
    """``actions`` with the release of every peer of a session that this decision ends moved
    before everything else (the shell appends in order): a session is never shown ended while the
    read models still show its peers held, so a next session that needs them can start at once."""
    ending = {
        a.event.session_id
        for a in actions
        if isinstance(a, Append) and isinstance(a.event, SessionCompleted | SessionFailed)
    }
    if not ending:
        return actions
    first = [
        a
        for a in actions
        if isinstance(a, Append) and isinstance(a.event, PeerReleased) and a.event.session_id in ending
    ]
    moved = {id(a) for a in first}
    return first + [a for a in actions if id(a) not in moved]


def at_work(state: State, now: float) -> dict[str, float]:
    """For each training run of a session with rounds: since when its peer's beats have named its
    ``Train`` without a break; ``now`` where they do not (a peer restarting, or not working on it:
    the presence timeout and ``resend`` judge it, not a round's deadline). ``Clocks.at_work``."""
    out: dict[str, float] = {}
    for session in state.sessions.values():
        if session.status != "running" or not session.rounds_open:
            continue
        for peer_id, run in session.runs.items():
            if run.status != "training":
                continue
            streak = state.streak.get(peer_id)
            mine = train_prefix(session.session_id, peer_id)  # any Train of the run: a re-sent one too
            out[peer_id] = streak[1] if streak is not None and streak[0].startswith(mine) else now
    return out


def resend(
    state: State, session: Session, clocks: Clocks, config: Config, skip: set[str] | None = None
) -> list[Action]:
    """Never stuck on a lost ``Train``: a training run whose peer no presence beat has shown working
    on its ``Train`` for ``resend_after`` gets it again (the same command, so the peer knows it as
    the same job, under the ``Nats-Msg-Id`` of the ``n``-th re-send, so JetStream stores it), every
    ``resend_after``; after ``max_resends`` the run fails with the reason. The wait counts from the
    run's start, the latest beat that named the ``Train``, and the scheduler's latest grace, whichever
    is latest. ``skip``: peers whose run fails in this decision anyway (offline, left out)."""
    timing = config.timing
    actions: list[Action] = []
    for key, run in sorted(session.runs.items()):
        peer_id = run.peer(key)
        peer = state.peers.get(peer_id)
        if run.status != "training" or peer is None or not peer.online or peer_id in (skip or ()):
            continue
        train = (
            train_prefix(session.session_id, peer_id)
            if run.trial is None
            else trial_train_id(session.session_id, peer_id, run.trial, run.attempt)
        )
        unseen = min(clocks.wall - run.since, clocks.now - state.seen_working(peer_id, train))
        if unseen <= timing.resend_after:
            continue
        n = int(unseen // timing.resend_after)
        if n > timing.max_resends:
            doing = state.doing.get(peer_id)
            reason = (
                f"not seen working on its Train {train} for {unseen:.0f}s after {timing.max_resends} re-sends "
                f"(its beats name {'no Train' if doing is None else repr(doing)})"
            )
            actions.append(peer_failed(session.session_id, peer_id, reason, clocks, trial_of(run)))
            continue
        command = _train(session, peer_id, run, clocks, config, resume_round(session, run))
        actions.append(Send(command, msg_id=resend_id(command, n)))
        # a peer that lost its Train (restarted) knows none of the facts it was sent: all of them
        # again, under new ids, so it rebuilds the round it resumes at from them
        actions += [Forward(peer_id, fact, again=n) for fact in session.facts]
    return actions


def resume_round(session: Session, run: Run) -> int:
    """The round a re-sent ``Train`` starts at: the session's open round (the last once all closed),
    never before the run's own start; a restarted peer rebuilds the average it starts from out of the
    forwarded facts, as a newcomer does, instead of redoing every round since its run began."""
    if not strategy_of(session.request.strategy).rounds or session.round < 1:
        return run.start_round
    return max(run.start_round, min(session.round, session.request.rounds))


def trial_of(run: Run) -> tuple[int, int] | None:
    """A search run's (trial, attempt): what its failure's id names."""
    return None if run.trial is None else (run.trial, run.attempt)


def _train(
    session: Session, peer_id: str, run: Run, clocks: Clocks, config: Config, start_round: int | None = None
) -> Train:
    if run.trial is not None:
        return trial_train(
            session.request, peer_id, run, clocks, config, session.max_model_bytes(run.model), session.init
        )
    return train_command(
        session.request,
        peer_id,
        run.hyperparameters,
        run.shard,
        run.start_round if start_round is None else start_round,
        clocks,
        config,
        session.max_model_bytes(),
        session.init,
        run.checkpoint,
    )


def forward(session: Session) -> list[Action]:
    """The facts each training participant needs, as ``Forward`` actions (a peer reads no session
    events): every fact of the last closed round and later, and to a newcomer that has not started
    training yet also the earlier rounds' facts it rebuilds the last average from. Sent once each
    (the shell remembers; the id is the fact's and the peer's)."""
    if not session.facts:
        return []
    recent = session.round - 1
    actions: list[Action] = []
    for peer_id, run in sorted(session.runs.items()):
        if run.status != "training":
            continue
        for fact in session.facts:
            round_ = getattr(fact, "round", 0)
            if round_ >= recent or (round_ < run.start_round and run.epoch == 0):
                actions.append(Forward(peer_id, fact))
    return actions


def stale_locks(state: State, clocks: Clocks, timing: Timing) -> list[Action]:
    """Release, with a compare-and-set on the peer's subject, every lock older than ``stale_lock``
    that no start or reassignment completed (its session is gone, queued, or has no run for the
    peer): the start that took it failed half-way, or its scheduler died. A younger one may be a
    start in progress, here or in another scheduler."""
    actions: list[Action] = []
    for peer in state.peers.values():
        sid = peer.session_id
        if sid is None:
            continue
        session = state.sessions.get(sid)
        if session is not None and peer.peer_id in session.runs and session.status != "queued":
            continue  # a run's lock: released once the run ends (``_finish``)
        if session is not None and session.searching and session.status == "running":
            continue  # a search's peer between trials: released once no trial is left (``_finish``)
        if clocks.wall - peer.locked_at <= timing.stale_lock:
            continue
        actions.append(AppendIf(release(sid, peer.peer_id, peer.lock_seq, clocks), expected=peer.seq))
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
        last = state.last_beat(peer.peer_id)
        if not peer.online or now - last <= timeout:
            continue
        offline = PeerWentOffline(
            event_id=f"{peer.peer_id}.offline.{peer.seq}", occurred_at=clocks.at, peer_id=peer.peer_id
        )
        actions.append(Append(offline))
        session = state.sessions.get(peer.session_id or "")
        run = session.training(peer.peer_id) if session is not None else None
        if session is not None and session.status == "running" and run is not None:
            reason = f"peer went offline: no presence beat for {now - last:.1f}s"
            actions.append(peer_failed(session.session_id, peer.peer_id, reason, clocks, trial_of(run)))
    return actions


def _finish(session: Session, locked: list[Peer], clocks: Clocks) -> list[Action]:
    """Complete or fail a session whose runs have all ended; stop and free the peers of ended runs
    (``locked``: the peers whose lock names the session).

    A session's peers are released BEFORE its terminal event is appended (in the same decision),
    so whoever sees the session ended (the read models apply the log in order) sees its peers
    free too, and a next session that needs them all can start at once."""
    sid = session.session_id
    all_ended = session.runs and all(r.status != "training" for r in session.runs.values())
    if session.searching:
        all_ended = all_ended and trials.done(session)
    if session.status == "running" and all_ended and not session.rounds_open:
        strategy = strategy_of(session.request.strategy)
        pending = strategy.evaluate(session)
        if pending:  # checked, not believed: the figures that name the winner are measured first
            return [_evaluate(session, p) for p in pending]
        best = strategy.model(session)
        if session.searching and session.concluded is None:  # what mattered, before the end
            return [Append(trials.concluded(session, best, clocks))]
        if best is None:
            finished = any(r.status == "done" for r in session.runs.values())
            reason = "no finished model passed the scheduler's evaluation" if finished else "every peer failed"
            failed = SessionFailed(event_id=f"{sid}.failed", occurred_at=clocks.at, session_id=sid, reason=reason)
            return [*_free(session, locked, clocks), Append(failed), *_tell(session, locked, failed)]
        model = session.runs[best]
        checked = session.evaluations.get(best)
        completed = SessionCompleted(
            event_id=f"{sid}.completed",
            occurred_at=clocks.at,
            session_id=sid,
            best_peer_id=model.peer(best),
            best_val_accuracy=model.val_accuracy,
            model_uri=model.model_uri or "",
            checked_val_accuracy=None if checked is None else checked.val_accuracy,
            best_trial=model.trial,
        )
        return [*_free(session, locked, clocks), Append(completed), *_tell(session, locked, completed)]
    actions: list[Action] = []
    for peer in locked:
        if session.ended is not None and _ended_run(session, peer):
            actions.append(Forward(peer.peer_id, session.ended))
    return actions + _free(session, locked, clocks)


def _ended_run(session: Session, peer: Peer) -> bool:
    """Whether ``peer``'s lock is that of a run of ``session`` that has ended (not a start or
    reassignment in progress, nor a peer still at work)."""
    run = session.run_of(peer.peer_id)
    if session.searching and session.status == "running" and not trials.done(session) and peer.online:
        # between two trials it takes the next one; with none left it waits for the trials still
        # training, since one whose peer dies runs again on a peer the search still holds
        return False
    return session.status != "queued" and run is not None and run.status != "training"


def _free(session: Session, locked: list[Peer], clocks: Clocks) -> list[Action]:
    """Stop (where it may still be at work) and release every peer of ``locked`` whose run ended."""
    actions: list[Action] = []
    for peer in locked:
        if not _ended_run(session, peer):
            continue
        run = session.run_of(peer.peer_id)
        if run is not None and run.status in ("failed", "stopped"):  # it may still be at work: tell it to stop
            actions.append(Send(stop(session.session_id, peer.peer_id, peer.lock_seq, clocks)))
        actions.append(Append(release(session.session_id, peer.peer_id, peer.lock_seq, clocks)))
    return actions


def _tell(session: Session, locked: list[Peer], ended: SessionEvent) -> list[Action]:
    """The session's end, forwarded to the peers of its ended runs (as it would be once back in the state)."""
    return [Forward(peer.peer_id, ended) for peer in locked if _ended_run(session, peer)]


def _evaluate(session: Session, key: str) -> Evaluate:
    run = session.runs[key]
    return Evaluate(session.session_id, run.peer(key), run.model_uri or "", run.model_sha256 or "", run.trial)


def _schedule(state: State, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
    """The queue (``placement.plan``), once each session's starting model is known (``lineage``: a
    refused one fails, a fork's is recomputed first): start every queued session that the idle peers
    matching its requirements can take (GPU peers first for a large model, CPU peers for a small
    one), highest priority first, first come first served within one; fail one whose queue timeout
    has passed, with the reason. The rest wait, in order, holding the idle peers they match. A fork
    that leaves peers out is placed after the others, on the idle peers left that it may use.

    Every session the log holds waits here: ``queue`` decides only whether the gateway accepts a
    session that cannot start at once (without it, the gateway's 400); one that got past that
    check in a race (another session took the peers first) waits, as it always did."""
    actions: list[Action] = []
    ready: list[tuple[Session, tuple[str, str] | None]] = []
    for session in sorted(state.sessions.values(), key=lambda s: s.seq):
        if session.status != "queued":
            continue
        match init := lineage.starting_model(session, state.sessions):
            case lineage.Refused(reason=reason):
                actions.append(session_failed(session.session_id, reason, clocks))
            case lineage.Recompute():
                actions.append(Prepare(init))
            case lineage.Pending():
                pass
            case _:
                ready.append((session, None if init is None else (init.uri, init.sha256)))
    if not ready:
        return actions
    inits = {s.session_id: init for s, init in ready}
    free = {p.peer_id for p in idle}
    groups: list[tuple[list[Session], set[str]]] = [([s for s, _ in ready if not lineage.excluded(s)], set())]
    groups += [([s], lineage.excluded(s)) for s, _ in ready if lineage.excluded(s)]
    for group, leave_out in groups:
        peers = [
            PeerView(p.peer_id, p.specs, idle=p.peer_id in free)
            for p in state.peers.values()
            if p.online and p.peer_id not in leave_out and (p.peer_id in free or p.session_id is not None)
        ]
        for decision in placement.plan([request_of(s) for s in group], peers, clocks.wall, config.rules):
            match decision:
                case Placement(session_id=sid, peer_ids=chosen, reason=reason):
                    session = state.sessions[sid]
                    chosen_peers = [state.peers[p] for p in chosen]
                    actions.append(start(session, chosen_peers, clocks, config, inits[sid], reason))
                    free -= set(chosen)
                case Expired(session_id=sid, reason=reason):
                    actions.append(session_failed(sid, f"queue timeout: {reason}", clocks))
    return actions


def request_of(session: Session) -> Request:
    """A queued session as placement sees it."""
    req = session.request
    return Request(
        session_id=session.session_id,
        num_peers=req.num_peers,
        param_count=session.param_count(),
        requested_at=req.occurred_at.timestamp(),
        order=session.order,
        requirements=req.requirements or Requirements(),
        policy=QueuePolicy(queue=True, queue_timeout_s=req.queue_timeout_s, priority=req.priority),
        data_bytes=session.data_bytes(),
        activation_bytes=session.activation_bytes(),
    )


def start(
    session: Session,
    peers: Sequence[Peer],
    clocks: Clocks,
    config: Config,
    init: tuple[str, str] | None = None,
    reason: str = "",
) -> Start:
    """Start ``session`` on ``peers``: their locks, the start with the strategy's assignment, the
    Trains; ``init``: its starting model ``(uri, sha256)``; ``reason``: the placement's."""
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
        init_uri=init[0] if init else "",
        init_sha256=init[1] if init else "",
        placement=bounded_text(reason),
    )
    max_bytes = session.max_model_bytes()
    trains = tuple(
        train_command(req, p, hp, assignment.shards.get(p, 0), 1, clocks, config, max_bytes, init)
        for p, hp in assignment.hyperparameters.items()
    )
    locks = tuple(lock(sid, p.peer_id, p.seq, cause, clocks) for p in peers)
    return Start(session_id=sid, locks=locks, started=started, expected=session.seq, trains=trains)


def recover(state: State, clocks: Clocks, config: Config) -> list[Action]:
    """At start-up, once the log is replayed: send the ``Train`` of every run not seen at work
    again (it may never have got it; the same id, so one that did is not sent twice), and release,
    with a compare-and-set, the stale locks that no start or reassignment completed (a scheduler
    died half-way; ``stale_locks``). Later, ``resend`` and ``stale_locks`` keep doing both."""
    actions: list[Action] = []
    for session in state.sessions.values():
        if session.status != "running":
            continue
        for key, run in session.runs.items():
            if run.status == "training" and run.epoch == 0:
                actions.append(Send(_train(session, run.peer(key), run, clocks, config)))
    return actions + stale_locks(state, clocks, config.timing)
