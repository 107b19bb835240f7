"""What every request handler shares: the event store, the read models, the blob store."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from litestar.datastructures import State
from nats.js import JetStreamContext

from swarmtrain.common import bus
from swarmtrain.common.blob import BlobStore
from swarmtrain.common.events import Event
from swarmtrain.common.settings import Settings
from swarmtrain.gateway.projection import ProjectionWatcher

PROJECTION_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    js: JetStreamContext
    pool: asyncpg.Pool
    store: BlobStore
    projection: ProjectionWatcher

    async def append(self, event: Event, expected_last_subject_seq: int | None = None) -> int:
        """Append ``event``, then wait (briefly) until the read models include it.

        Returns the event's stream sequence. If the projector is slow, it returns anyway after
        ``PROJECTION_WAIT_S``: the event is stored, only the read-your-writes promise is missed.
        """
        seq = await bus.append(self.js, event, expected_last_subject_seq)
        await self.projection.wait_for(seq, max_wait_s=PROJECTION_WAIT_S)
        return seq


def provide_gateway(state: State) -> Gateway:
    gateway: Gateway = state.gateway
    return gateway
