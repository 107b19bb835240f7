"""sweep: every peer trains the whole dataset with its own hyperparameters; the session's model is
the best one by the scheduler's own evaluation on the validation split (``ModelEvaluated``), never
by a peer's claim: the finished models are evaluated in the order of their claims until no model
left unevaluated claims more than the best figure measured (a lie costs the liar one evaluation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from swarmtrain.common.events import SessionRequested, ShardReassigned
from swarmtrain.scheduler.actions import Action, Clocks, Config, Reassign, digest, lock, train_command
from swarmtrain.scheduler.lineage import eligible
from swarmtrain.scheduler.strategies.base import STRATEGIES, Assignment, best_checked, to_evaluate

if TYPE_CHECKING:
    from swarmtrain.scheduler.state import Peer, Session


class Sweep:
    name = "sweep"
    rounds = False

    def assign(self, request: SessionRequested, peer_ids: Sequence[str]) -> Assignment:
        """Peer i (in the given order) trains with the request's i-th hyperparameters; a search
        starts with no run (its trials are handed out one by one, ``scheduler.trials``)."""
        if request.search is not None:
            return Assignment({}, {})
        return Assignment(dict(zip(peer_ids, request.hyperparameters, strict=True)), {})

    def step(self, session: Session, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
        """A failed peer ends only its own run; the session goes on with the others. A failed run
        that saved a checkpoint (``checkpoint_every``) is taken over by an idle peer, from that
        checkpoint, when ``on_peer_failure`` is ``reassign`` (``take_over``)."""
        return take_over(session, idle, clocks, config)

    def evaluate(self, session: Session) -> list[str]:
        return to_evaluate(session)

    def model(self, session: Session) -> str | None:
        return best_checked(session)


STRATEGY = STRATEGIES.add(Sweep.name, Sweep())


def take_over(session: Session, idle: Sequence[Peer], clocks: Clocks, config: Config) -> list[Action]:
    """Each failed run with a checkpoint that no peer took over yet goes to an idle peer that has
    not run in the session (a run is a peer's once): a ``ShardReassigned`` from the failed peer (its
    run's hyperparameters and last checkpoint go with it, ``state``), and a ``Train`` that resumes
    after the checkpoint's epoch. A run without a checkpoint fails alone, as it always did."""
    if session.request.on_peer_failure != "reassign" or session.searching:
        return []
    taken = {f.from_peer_id for f in session.facts if isinstance(f, ShardReassigned)}
    free = [p for p in eligible(session, idle) if p.peer_id not in session.runs]
    actions: list[Action] = []
    for previous, run in sorted(session.runs.items()):
        if run.status != "failed" or run.checkpoint is None or previous in taken or not free:
            continue
        chosen = free.pop(0)
        req, sid, peer_id = session.request, session.session_id, chosen.peer_id
        moved = ShardReassigned(
            event_id=f"{sid}.{peer_id}.reassigned.{run.shard}",
            occurred_at=clocks.at,
            session_id=sid,
            shard=run.shard,
            from_peer_id=previous,
            to_peer_id=peer_id,
            round=1,
        )
        train = train_command(
            req, peer_id, run.hyperparameters, run.shard, 1, clocks, config, session.max_model_bytes(), session.init,
            resume=run.checkpoint,
        )  # fmt: skip
        cause = digest(sid, previous, peer_id, chosen.seq)
        actions.append(Reassign(lock=lock(sid, peer_id, chosen.seq, cause, clocks), moved=moved, train=train))
    return actions
