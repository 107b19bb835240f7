"""fedavg: each peer trains its shard for a round; the scheduler closes a round once every training
participant published its update, or at a deadline adapted to the rounds seen so far, and acts on
failed participants as the session's ``on_peer_failure`` says. The session's model is the one most
peers agree on (by sha256), not a peer's own claim of accuracy.

The session's round options (aggregator, outer optimizer, compression, sharding, keeping the
local optimizer, the norm bound) travel in every ``Train`` (``actions.train_command``); the peers
apply them. ``label_skew`` shards are not a function of the row count alone: the shell computes
their label histograms from the dataset (``evaluation.shard_histograms``, the peers' own sharding
code) before it appends ``SessionStarted``, which carries them, so each shard's sample count is
checked exactly as an ``iid`` one is (``Session.training_rows``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from swarmtrain.common.events import RoundClosed, SessionRequested, ShardReassigned
from swarmtrain.scheduler.actions import (
    Action,
    Append,
    Clocks,
    Config,
    Reassign,
    Timing,
    digest,
    lock,
    peer_failed,
    session_failed,
    train_command,
)
from swarmtrain.scheduler.lineage import eligible
from swarmtrain.scheduler.strategies.base import STRATEGIES, Assignment, best_validated

if TYPE_CHECKING:
    from swarmtrain.scheduler.state import Peer, Session


class FedAvg:
    name = "fedavg"
    rounds = True

    def assign(self, request: SessionRequested, peer_ids: Sequence[str]) -> Assignment:
        """Peer i (in the given order) trains shard i with the request's i-th hyperparameters."""
        return Assignment(
            dict(zip(peer_ids, request.hyperparameters, strict=True)), {p: i for i, p in enumerate(peer_ids)}
        )

    def step(self, session: Session, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
        if not session.rounds_open:
            return []
        closing = close_round(session, clocks, config.timing)
        if any(isinstance(a, Append) and isinstance(a.event, RoundClosed) for a in closing):
            return closing  # a shard is handed over only into a round that stays open until the newcomer publishes
        return closing + on_failures(session, idle, clocks, config)

    def evaluate(self, session: Session) -> list[str]:
        """Nothing: the session's model is the one most peers agree on, not anyone's claim."""
        return []

    def model(self, session: Session) -> str | None:
        done = {p: r for p, r in session.runs.items() if r.status == "done" and r.model_uri}
        if not done:
            return None
        # every honest peer holds the same averaged model: take the most common one
        votes = Counter(r.model_sha256 for r in done.values())
        agreed = min(votes, key=lambda sha: (-votes[sha], sha or ""))
        return best_validated({p: r for p, r in done.items() if r.model_sha256 == agreed})


STRATEGY = STRATEGIES.add(FedAvg.name, FedAvg())


def needs_histograms(request: SessionRequested) -> bool:
    """Whether the session's ``SessionStarted`` must carry its shards' label histograms: a fedavg
    whose shards' sizes depend on the labels (``label_skew``)."""
    return request.strategy == STRATEGY.name and request.round_options.sharding.name != "iid"


def round_deadline(session: Session, timing: Timing) -> float:
    """Seconds after ``round_base`` that the open round may take: adapted to the rounds seen so far."""
    seen = max(session.longest_round, (session.first_update or session.round_opened) - session.round_opened)
    if seen <= 0:
        return timing.first_round_timeout
    return max(timing.round_min, timing.round_factor * seen)


def close_round(session: Session, clocks: Clocks, timing: Timing) -> list[Action]:
    """Close the open round once every training participant published, or at its deadline: the
    round's, counted from its base or the scheduler's latest grace, and for a peer that took up its
    work later (``Clocks.at_work``: restarted, its ``Train`` sent again) also from then."""
    sid, r = session.session_id, session.round
    waiting = sorted(p for p, run in session.runs.items() if run.status == "training" and p not in session.updates)
    # the time the scheduler could not hear the peers (paused, catching up, the log unreachable)
    # counts against nobody: the round's deadline counts from the latest of its base and that
    deadline = round_deadline(session, timing)
    overdue = clocks.wall - max(session.round_base, clocks.heard_since) > deadline
    if waiting and overdue and any(clocks.now - clocks.at_work.get(p, float("-inf")) <= deadline for p in waiting):
        return []  # a peer back at work later than the round's start has its whole deadline too
    if waiting and not overdue:
        return []
    if not session.updates and not overdue:
        return []  # nobody left to wait for and nothing to average: failures decide the session's fate
    actions: list[Action] = [peer_failed(sid, p, f"missed the deadline of round {r}", clocks) for p in waiting]
    if session.updates:
        updates = [session.updates[p] for p in sorted(session.updates)]
        closed = RoundClosed(
            event_id=f"{sid}.r{r}.closed",
            occurred_at=clocks.at,
            session_id=sid,
            round=r,
            updates=updates,
            left_out=waiting,
        )
        actions.append(Append(closed))
    return actions


def on_failures(session: Session, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
    """Act on participants that failed, as the session's ``on_peer_failure`` says."""
    req, sid = session.request, session.session_id
    failed = sorted(p for p, run in session.runs.items() if run.status == "failed")
    if failed and req.on_peer_failure == "fail":
        return [session_failed(sid, f"peer {failed[0]} failed", clocks)]
    actions: list[Action] = []
    if req.on_peer_failure == "reassign":
        free = eligible(session, idle)  # a fork's excluded peers never take a shard
        for shard in session.orphan_shards():
            # never a peer that already ran in this session: a run is a peer's once (``state`` ignores a
            # reassignment to it), so handing it a shard again would lock and release it forever
            candidates = [p for p in free if p.peer_id not in session.runs]
            if not candidates:
                break
            free.remove(chosen := candidates[0])
            previous = max(p for p, run in session.runs.items() if run.shard == shard)
            actions.append(hand_over(session, shard, previous, chosen, clocks, config))
    if not actions and not any(run.status == "training" for run in session.runs.values()):
        actions.append(session_failed(sid, "no participant left to train", clocks))
    return actions


def hand_over(session: Session, shard: int, previous: str, chosen: Peer, clocks: Clocks, config: Config) -> Reassign:
    """``chosen`` takes ``shard`` over from ``previous`` in the open round, from the last average."""
    req, sid, peer_id = session.request, session.session_id, chosen.peer_id
    moved = ShardReassigned(
        event_id=f"{sid}.{peer_id}.reassigned.{shard}",
        occurred_at=clocks.at,
        session_id=sid,
        shard=shard,
        from_peer_id=previous,
        to_peer_id=peer_id,
        round=session.round,
    )
    hyperparameters = req.hyperparameters[shard]
    return Reassign(
        lock=lock(sid, peer_id, chosen.seq, digest(sid, shard, peer_id, chosen.seq), clocks),
        moved=moved,
        train=train_command(
            req, peer_id, hyperparameters, shard, session.round, clocks, config, session.max_model_bytes(), session.init
        ),
    )
