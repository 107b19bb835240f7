"""GET /peers, /healthz, /schema, error bodies, and ``run`` serving over real HTTP."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest

from swarmtrain.common import servers
from swarmtrain.common.events import PeerLocked, PeerRegistered, PeerWentOffline, PeerWentOnline
from swarmtrain.common.settings import Settings
from swarmtrain.gateway import create_app, run
from tests.gateway.conftest import Append
from tests.gateway.helpers import Client, Headers


async def test_peers_with_their_status(client: Client, alice: Headers, append: Append) -> None:
    await append(
        PeerRegistered(peer_id="a", name="alpha", device="cuda:0"),
        PeerWentOnline(peer_id="a"),
        PeerRegistered(peer_id="b", name="bravo", device="cpu"),
        PeerWentOnline(peer_id="b"),
        PeerLocked(peer_id="b", session_id="s1"),
        PeerRegistered(peer_id="c", name="charlie", device="cpu"),
        PeerWentOnline(peer_id="c"),
        PeerWentOffline(peer_id="c"),
    )
    r = await client.get("/peers", headers=alice)
    assert r.status_code == 200
    peers = r.json()
    assert [(p["peer_id"], p["name"], p["status"], p["device"]) for p in peers] == [
        ("a", "alpha", "online", "cuda:0"),
        ("b", "bravo", "training", "cpu"),
        ("c", "charlie", "offline", "cpu"),
    ]
    assert all(p["last_seen"] for p in peers)


async def test_healthz_and_schema_are_public(client: Client) -> None:
    r = await client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in ("/auth/signup", "/auth/signin", "/datasets", "/sessions", "/sessions/start", "/peers"):
        assert path in paths
    assert "/sessions/{session_id}/model" in paths


async def test_errors_are_problem_json(client: Client, alice: Headers) -> None:
    r = await client.get("/no/such/route", headers=alice)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert set(r.json()) >= {"type", "title", "status", "detail"}
    r = await client.post("/sessions", content=b"{not json", headers={**alice, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert "Traceback" not in r.text


def test_missing_jwt_secret_is_a_clear_startup_error(settings: Settings) -> None:
    with pytest.raises(ValueError, match="SWARMTRAIN_JWT_SECRET is not set"):
        create_app(msgspec.structs.replace(settings, jwt_secret=None))


async def test_run_serves_until_stopped(settings: Settings, projector: None) -> None:
    port = servers.free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(run(msgspec.structs.replace(settings, port=port), stop))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        async with asyncio.timeout(20):
            while True:
                assert not task.done(), task.exception()
                try:
                    r = await http.get("/healthz")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
        assert r.json() == {"status": "ok"}
        r = await http.post("/auth/signup", json={"email": "h@example.com", "password": "long enough"})
        assert r.status_code == 201
    stop.set()
    await asyncio.wait_for(task, 15)
