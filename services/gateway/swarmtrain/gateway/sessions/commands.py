"""What the session routes append to the event log: a session request, and a cancellation."""

from __future__ import annotations

from functools import partial

import msgspec
import nats.js.errors

from swarmtrain.common import bus, subjects
from swarmtrain.common.events import DataSpec, SessionCancelled, SessionRequested, new_id
from swarmtrain.common.status import SESSION_TERMINAL
from swarmtrain.gateway.errors import Conflict, Unavailable
from swarmtrain.gateway.ownership import owned
from swarmtrain.gateway.sessions import queries
from swarmtrain.gateway.sessions.planning import SessionPlan
from swarmtrain.gateway.state import Gateway

CANCEL_ATTEMPTS = 20
READ_MODELS_WAIT_S = 5.0


async def request_session(
    gw: Gateway,
    owner_id: str,
    plan: SessionPlan,
    *,
    dataset_id: str,
    uri: str,
    sha256: str,
    label_column: str,
    data: DataSpec | None = None,
) -> str:
    """Append ``SessionRequested`` for ``plan`` on the dataset (the plan's values whole, each its
    field of the same name); returns the new session's id."""
    session_id = new_id()
    await gw.append(
        SessionRequested(
            session_id=session_id,
            owner_id=owner_id,
            dataset_id=dataset_id,
            dataset_uri=uri,
            dataset_sha256=sha256,
            label_column=label_column,
            **msgspec.structs.asdict(plan),
            data=data or DataSpec(),
        )
    )
    return session_id


async def cancel(gw: Gateway, owner_id: str, session_id: str) -> None:
    """Append ``SessionCancelled`` unless the session has ended: a compare-and-set on its subject.

    The status is read once the read models have caught up with the subject's last event, and
    the append expects that event to be still the last, so no terminal event can slip in between.
    404 for a session that is not ``owner_id``'s, 409 for one that has ended.
    """
    status_of = partial(queries.owned_status, gw.pool, owner_id)
    await owned("session", session_id, status_of)  # 404 before the log is asked anything
    subject = subjects.session_events(session_id)
    for _ in range(CANCEL_ATTEMPTS):
        try:
            last = int((await gw.js.get_last_msg(bus.EVENTS_STREAM, subject)).seq or 0)
        except nats.js.errors.NotFoundError:
            last = 0
        if not await gw.projection.wait_for(last, max_wait_s=READ_MODELS_WAIT_S):
            raise Unavailable("the read models are behind the event log; try again shortly")
        status = await owned("session", session_id, status_of)
        if status in SESSION_TERMINAL:
            raise Conflict(f"the session is {status} already")
        try:
            await gw.append(SessionCancelled(session_id=session_id), expected_last_subject_seq=last)
            return
        except bus.WrongLastSequence:
            continue  # an event arrived in between: look again
    raise Unavailable("the session is changing too fast to cancel; try again")
