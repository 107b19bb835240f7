"""Cancelling a running session end to end: the gateway appends SessionCancelled, the real
scheduler stops the session's peers and releases them (real NATS, PostgreSQL, projector and
scheduler; the peers are stood in for by their presence beats)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from swarmtrain.common import bus, subjects
from swarmtrain.common.events import Stop, decode_command
from swarmtrain.common.settings import Settings
from tests.factories import session_body
from tests.gateway.conftest import OnlinePeers
from tests.gateway.helpers import HP, Client, Headers, small_csv, upload
from tests.support import beating, wait_for


@pytest.fixture
async def scheduler(settings: Settings, projector: None) -> AsyncIterator[None]:
    from swarmtrain.scheduler.service import run

    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop))
    yield
    stop.set()
    await asyncio.wait_for(task, 15)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    """A plain NATS client on the test's server, for the fake peers' presence beats."""
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


async def test_cancel_stops_and_releases_the_peers(
    client: Client,
    alice: Headers,
    online_peers: OnlinePeers,
    scheduler: None,
    js: JetStreamContext,
    nc: NATS,
    settings: Settings,
) -> None:
    peers = await online_peers(2)
    async with beating(nc, peers, settings.presence_interval_s):
        dataset_id = (await upload(client, alice, small_csv(rows=40))).json()["dataset_id"]
        body = session_body(dataset_id, 2, HP)
        sid = (await client.post("/sessions", json=body, headers=alice)).json()["session_id"]

        async def running() -> bool:
            session = (await client.get(f"/sessions/{sid}", headers=alice)).json()
            return bool(session["status"] == "running" and len(session["peers"]) == 2)

        await wait_for(running, "the session to run on both peers", timeout=15, interval=0.1)
        statuses = {p["peer_id"]: p["status"] for p in (await client.get("/peers", headers=alice)).json()}
        assert statuses == {p: "training" for p in peers}

        r = await client.post(f"/sessions/{sid}/cancel", headers=alice)
        assert (r.status_code, r.json()["status"]) == (202, "cancelled")

        async def released() -> bool:
            listed = (await client.get("/peers", headers=alice)).json()
            return all(p["status"] == "online" and p["session_id"] is None for p in listed)

        await wait_for(released, "the peers to be released", timeout=15, interval=0.1)
        session = (await client.get(f"/sessions/{sid}", headers=alice)).json()
        assert session["status"] == "cancelled" and session["reason"] == "cancelled by its owner"
        assert {p["status"] for p in session["peers"]} == {"stopped"}
        stops = set()
        for peer_id in peers:
            msg = await js.get_last_msg(bus.COMMANDS_STREAM, subjects.peer_command(peer_id))
            assert msg.data is not None
            command = decode_command(msg.data)
            if isinstance(command, Stop) and command.session_id == sid:
                stops.add(peer_id)
        assert stops == set(peers)
