"""Sessions that start from another: ``init_from`` on a new session, and ``POST /sessions/{id}/fork``.

The parent must be the caller's own session (404 otherwise, as for one that does not exist); its
request is read from the event log (its first event). What joins the two requests is checked by
:func:`check_lineage` (pure; 400): the same model spec, a dataset of the same shape (the tensors
must fit), and a round only of a session that has rounds, within them. A fork is a session request
built from the parent's (:func:`fork_fields`), checked exactly as ``POST /sessions`` checks one.
The scheduler resolves the starting model from the log (``scheduler.lineage``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec
from litestar.exceptions import ClientException, NotFoundException

from swarmtrain.common.events import InitFrom, SessionRequested
from swarmtrain.common.strategies import rules
from swarmtrain.gateway import eventlog
from swarmtrain.gateway.datasets import owned_dataset
from swarmtrain.gateway.ownership import owned
from swarmtrain.gateway.sessions import commands, queries
from swarmtrain.gateway.sessions.corpus import training_view
from swarmtrain.gateway.sessions.planning import SessionPlan, check_against_dataset, parse_session, plan_session
from swarmtrain.gateway.sessions.schemas import ForkIn, SessionCreated, SessionIn
from swarmtrain.gateway.state import Gateway

Shape = tuple[int, int]
"""A dataset's (features, classes): what a model's tensors depend on besides its spec."""


# ------------------------------------------------------------------ pure rules


def check_lineage(plan: SessionPlan, parent: SessionRequested, shape: Shape, parent_shape: Shape) -> None:
    """400 unless a session of ``plan`` on a dataset of ``shape`` can start from ``parent``'s model."""
    init = plan.init_from
    if init is None:
        return
    if plan.model != parent.model:
        raise ClientException(
            f"init_from: the model spec must be session {parent.session_id}'s "
            f"({msgspec.json.encode(parent.model).decode()}): its weights must fit"
        )
    if shape != parent_shape:
        raise ClientException(
            f"init_from: the dataset has {shape[0]} features and {shape[1]} classes, session "
            f"{parent.session_id}'s had {parent_shape[0]} and {parent_shape[1]}: its weights would not fit"
        )
    if init.round is not None:
        if not rules(parent.strategy).rounds:
            raise ClientException(f"init_from.round: session {parent.session_id} is a {parent.strategy}: no rounds")
        if init.round > parent.rounds:
            raise ClientException(f"init_from.round: session {parent.session_id} has rounds 1..{parent.rounds}")
    if init.exclude_peers and init.round is None:
        raise ClientException("exclude_peers needs a round")


def fork_fields(parent: SessionRequested, fork: ForkIn) -> dict[str, Any]:
    """The ``SessionIn`` fields of a fork of ``parent`` at ``fork.round``: the parent's settings
    (every one that a session request takes, so an option added to both is inherited), with what
    the fork gives instead; ``rounds`` defaults to the parent's rounds left (at least 1)."""
    known = set(SessionIn.__struct_fields__) - {"init_from"}
    fields: dict[str, Any] = {k: v for k, v in msgspec.to_builtins(parent).items() if k in known}
    fields["model"] = msgspec.to_builtins(parent.model)  # the kind and its own fields
    fields["hyperparameters"] = fields["hyperparameters"][0]  # one shared model, one set
    fields["rounds"] = fork.rounds if fork.rounds is not None else max(1, parent.rounds - fork.round)
    given = {"hyperparameters": fork.hyperparameters, "num_peers": fork.num_peers}
    fields |= {k: msgspec.to_builtins(v) for k, v in given.items() if v is not None}
    options = {"aggregator": fork.aggregator, "outer": fork.outer}
    fields["round_options"] = fields["round_options"] | {k: v for k, v in options.items() if v is not None}
    return fields


def check_excluded(excluded: list[str], participants: set[str], parent_id: str) -> None:
    """400 for an excluded peer that took no part in the parent."""
    strangers = sorted(set(excluded) - participants)
    if strangers:
        raise ClientException(f"exclude_peers: {', '.join(strangers)} took no part in session {parent_id}")


# ------------------------------------------------------------------ shells


async def parent_request(gw: Gateway, owner_id: str, session_id: str) -> SessionRequested:
    """The request of ``owner_id``'s session ``session_id``, from the log; 404 unless it is theirs."""
    await owned("session", session_id, partial(queries.owned_status, gw.pool, owner_id))
    events, _, _ = await eventlog.page(gw.js, session_id, 0, 1)
    first = events[0][1] if events else None
    if not isinstance(first, SessionRequested) or first.owner_id != owner_id:
        raise NotFoundException(f"no session {session_id}")
    return first


async def _shape(gw: Gateway, owner_id: str, dataset_id: str) -> Shape:
    row = await owned_dataset(gw, owner_id, dataset_id)
    return int(row["features"]), int(row["classes"])


async def check_init_from(gw: Gateway, owner_id: str, plan: SessionPlan, shape: Shape) -> None:
    """404 unless ``plan``'s ``init_from`` names one of ``owner_id``'s sessions; 400 unless its
    model can start a session of ``plan`` on a dataset of ``shape``."""
    if plan.init_from is None:
        return
    parent = await parent_request(gw, owner_id, plan.init_from.session_id)
    check_lineage(plan, parent, shape, await _shape(gw, owner_id, parent.dataset_id))


async def fork(gw: Gateway, owner_id: str, parent_id: str, data: ForkIn) -> SessionCreated:
    """Request a fork of ``owner_id``'s session ``parent_id`` (see the module's rules)."""
    parent = await parent_request(gw, owner_id, parent_id)
    if not rules(parent.strategy).rounds:
        raise ClientException(f"a {parent.strategy} has no rounds to fork at: start a session with init_from instead")
    if data.round > parent.rounds:
        raise ClientException(f"round: session {parent_id} has rounds 1..{parent.rounds}")
    participants = {
        r["peer_id"] for r in await gw.pool.fetch("SELECT peer_id FROM session_peers WHERE session_id = $1", parent_id)
    }
    check_excluded(data.exclude_peers, participants, parent_id)
    plan = plan_session(parse_session(fork_fields(parent, data)), gw.settings)
    init = InitFrom(session_id=parent_id, round=data.round, exclude_peers=sorted(set(data.exclude_peers)))
    plan = msgspec.structs.replace(plan, init_from=init)
    dataset = await owned_dataset(gw, owner_id, parent.dataset_id)
    shape = (int(dataset["features"]), int(dataset["classes"]))
    view = training_view(dataset, plan.model)
    check_against_dataset(
        plan, rows=view.rows, features=view.features, classes=view.outputs, settings=gw.settings, shape=view.shape
    )
    check_lineage(plan, parent, shape, shape)
    async with gw.session_locks.hold(owner_id):
        await queries.require_session_room(gw.pool, owner_id, gw.settings.max_active_sessions)
        await queries.require_idle_peers(gw.pool, plan.num_peers)
        session_id = await commands.request_session(
            gw,
            owner_id,
            plan,
            dataset_id=parent.dataset_id,
            uri=dataset["uri"],
            sha256=dataset["sha256"],
            label_column=dataset["label_column"],
            data=view.data,
        )
    return SessionCreated(session_id=session_id, status=await queries.status(gw.pool, session_id))
