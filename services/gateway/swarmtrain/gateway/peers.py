"""The swarm as the read models see it."""

from __future__ import annotations

from datetime import datetime

import asyncpg
import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency

from swarmtrain.common.specs import PeerSpecs
from swarmtrain.common.status import PeerStatus
from swarmtrain.gateway.auth import BEARER
from swarmtrain.gateway.datasets import MAX_PAGE, Limit, Offset
from swarmtrain.gateway.errors import documented
from swarmtrain.gateway.state import Gateway


class PeerOut(msgspec.Struct, kw_only=True):
    peer_id: str
    name: str
    status: PeerStatus
    device: str
    last_seen: datetime
    session_id: str | None
    specs: PeerSpecs | None = None
    """What it has: cores, memory, GPUs, torch and CUDA versions, OS, owner labels (None: a peer older than specs)."""


def stored_specs(raw: str | None) -> PeerSpecs | None:
    """A peer's stored specs; None for none, or for a row that no longer decodes (never placed on)."""
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=PeerSpecs)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def peer_status(online: bool, session_id: str | None) -> PeerStatus:
    if not online:
        return "offline"
    return "training" if session_id is not None else "online"


def _peer_out(row: asyncpg.Record) -> PeerOut:
    return PeerOut(
        peer_id=row["peer_id"],
        name=row["name"],
        status=peer_status(row["online"], row["session_id"]),
        device=row["device"],
        last_seen=row["last_seen"],
        session_id=row["session_id"],
        specs=stored_specs(row["specs"]),
    )


class PeerController(Controller):
    path = "/peers"
    tags = ["peers"]
    security = BEARER

    @get(
        "/",
        summary="Every peer the swarm has seen, with its status and specs",
        description=f"Paginated with `limit` (default {MAX_PAGE}, at most {MAX_PAGE}) and `offset`.",
        responses=documented(400, 401),
    )
    async def list_peers(
        self, gw: NamedDependency[Gateway], limit: Limit = MAX_PAGE, offset: Offset = 0
    ) -> list[PeerOut]:
        rows = await gw.pool.fetch(
            """SELECT peer_id, name, device, online, session_id, last_seen, specs FROM peers
               ORDER BY name, peer_id LIMIT $1 OFFSET $2""",
            limit,
            offset,
        )
        return [_peer_out(row) for row in rows]
