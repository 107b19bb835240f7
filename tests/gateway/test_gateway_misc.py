"""GET /peers, /healthz, /schema, error bodies, and ``run`` serving over real HTTP."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import asyncpg
import httpx
import msgspec
import pytest
from litestar import get
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from swarmtrain.common import bus, servers
from swarmtrain.common.events import PeerLocked, PeerRegistered, PeerWentOffline, PeerWentOnline
from swarmtrain.common.settings import Settings
from swarmtrain.gateway import create_app, run
from swarmtrain.gateway.state import Gateway
from swarmtrain.projector.projection import ensure_schema
from tests.gateway.conftest import Append
from tests.gateway.helpers import Client, Headers, healthy, serving, sign_up_and_in
from tests.support import stop_process, wait_for


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
        await wait_for(lambda: healthy(http, task), "the gateway to answer /healthz", timeout=20)
        r = await http.get("/healthz")
        assert r.json() == {"status": "ok"}
        r = await http.post("/auth/signup", json={"email": "h@example.com", "password": "long enough"})
        assert r.status_code == 201
    stop.set()
    await asyncio.wait_for(task, 15)


# ------------------------------------------------------------------ problems, never tracebacks


def is_problem(r: httpx.Response, status: int) -> bool:
    body = r.json()
    return (
        r.status_code == status
        and r.headers["content-type"].startswith("application/problem+json")
        and set(body) >= {"type", "title", "status", "detail"}
        and body["status"] == status
        and isinstance(body["detail"], str)
        and body["detail"] != ""
    )


async def test_an_unexpected_exception_is_a_bare_500_problem(settings: Settings, projector: None) -> None:
    @get("/boom", sync_to_thread=False)
    def boom() -> None:
        raise RuntimeError("secret at /work/main/services/gateway/swarmtrain/gateway/app.py line 42")

    @get("/boom-async")
    async def boom_async() -> None:
        raise KeyError("password_hash")

    app = create_app(settings)
    app.register(boom)
    app.register(boom_async)
    async with serving(app) as client:
        alice = await sign_up_and_in(client, "alice@example.com")
        with capture_logs() as logs:
            for path in ("/boom", "/boom-async"):
                r = await client.get(path, headers=alice)
                assert is_problem(r, 500), r.text
                assert r.json()["detail"] == "internal server error"
                for leak in ("Traceback", "/work", ".py", "secret", "RuntimeError", "KeyError", "password_hash"):
                    assert leak not in r.text
        assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["unhandled error"] * 2


async def test_a_missing_read_model_is_a_503_problem(client: Client, alice: Headers, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP TABLE session_peers")
    finally:
        await conn.close()
    with capture_logs():
        r = await client.get("/sessions", headers=alice)
    assert is_problem(r, 503) and r.headers["retry-after"] == "1"
    assert "read-model database is unavailable" in r.json()["detail"] and "session_peers" not in r.text


async def test_routing_and_parsing_errors_are_problems(client: Client, alice: Headers) -> None:
    as_json = {**alice, "Content-Type": "application/json"}
    as_form = {**alice, "Content-Type": "multipart/form-data"}
    checks = [
        (await client.get("/no/such/route", headers=alice), 404),
        (await client.delete("/sessions", headers=alice), 405),
        (await client.put("/auth/signin", json={}), 405),
        (await client.post("/sessions", content=b"{not json", headers=as_json), 400),
        (await client.post("/sessions", json=[1, 2], headers=alice), 400),
        (await client.post("/auth/signin", json={"email": 5, "password": None}), 400),
        (await client.get("/sessions", params={"limit": "many"}, headers=alice), 400),
        (await client.get("/sessions", params={"limit": 100_000}, headers=alice), 400),
        (await client.get("/datasets", params={"offset": -1}, headers=alice), 400),
        (await client.post("/datasets", content=b"--x\r\n\r\n", headers=as_form), 400),
        (await client.get("/sessions"), 401),
    ]  # fmt: skip
    for r, status in checks:
        assert is_problem(r, status), (r.request.method, r.request.url, r.status_code, r.text)
        assert "Traceback" not in r.text and "/work" not in r.text and "litestar" not in r.text.lower()


async def test_json_bodies_have_their_own_small_limit(client: Client, alice: Headers) -> None:
    padding = "x" * (70 * 1024)
    for path, headers in (("/auth/signup", {}), ("/auth/signin", {}), ("/sessions", alice)):
        r = await client.post(path, json={"email": padding, "password": padding}, headers=headers)
        assert is_problem(r, 413), (path, r.text)
        assert r.json()["detail"] == "request body larger than the 65536 bytes limit"


# ------------------------------------------------------------------ readiness


async def test_readyz_reports_the_projection_lag(client: Client, gateway: Gateway) -> None:
    r = await client.get("/readyz")
    body = r.json()
    assert r.status_code == 200, r.text
    assert (body["status"], body["nats"], body["postgres"]) == ("ready", "connected", "reachable")
    assert body["projection_lag"] == body["stream_last_seq"] - body["projection_position"] >= 0


async def test_readyz_counts_events_not_yet_projected(settings: Settings, js: JetStreamContext) -> None:
    """No projector running: whatever is appended is lag."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        r = await _readyz_without_projector(settings)
        assert r.status_code == 503 and "not created its schema" in r.json()["postgres"]
        await ensure_schema(conn)
        for i in range(3):
            await bus.append(js, PeerRegistered(peer_id=f"p{i}", name=f"p{i}", device="cpu"))
        r = await _readyz_without_projector(settings)
        assert r.status_code == 200, r.text
        assert (r.json()["stream_last_seq"], r.json()["projection_position"], r.json()["projection_lag"]) == (3, 0, 3)
    finally:
        await conn.close()


async def _readyz_without_projector(settings: Settings) -> httpx.Response:
    async with serving(create_app(settings)) as client:
        return await client.get("/readyz")


async def test_readyz_is_503_while_nats_does_not_answer(
    client: Client, nats_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    assert (await client.get("/readyz")).status_code == 200
    proc = nats_server[1]
    stop_process(proc.pid)
    try:
        r = await client.get("/readyz")
    finally:
        proc.send_signal(signal.SIGCONT)
    assert is_problem(r, 503), r.text
    assert r.json()["nats"].startswith(("unreachable", "disconnected")) and r.json()["postgres"] == "reachable"
    assert (await client.get("/healthz")).status_code == 200  # alive all along
    assert (await client.get("/readyz")).status_code == 200


async def test_readyz_is_never_500_when_postgres_drops_the_gateways_connection(
    client: Client, gateway: Gateway, settings: Settings
) -> None:
    """A killed server ends its sessions under the pool: the probe answers 503 while it cannot reach
    PostgreSQL, 200 once the pool has replaced the connection, and never 500."""
    async with gateway.pool.acquire() as conn:
        pid = conn.get_server_pid()
    admin = await asyncpg.connect(settings.database_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    r = await client.get("/readyz")
    assert r.status_code in (200, 503), r.text
    if r.status_code == 503:
        assert is_problem(r, 503) and r.json()["postgres"].startswith("unreachable"), r.text
        r = await client.get("/readyz")  # the pool replaced the dead connection
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ OpenAPI


async def test_openapi_describes_every_route_its_auth_and_its_errors(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["BearerToken"]["scheme"] == "Bearer"
    public = {"/auth/signup", "/auth/signin", "/healthz", "/readyz", "/blobs/{key}"}  # /blobs: signed URLs
    expected_routes = {
        ("get", "/auth/me"), ("get", "/datasets"), ("get", "/datasets/{dataset_id}"), ("get", "/sessions"),
        ("get", "/sessions/{session_id}"), ("post", "/sessions/{session_id}/cancel"),
        ("get", "/sessions/{session_id}/events"), ("get", "/sessions/{session_id}/stream"),
        ("get", "/sessions/{session_id}/metrics"), ("get", "/sessions/{session_id}/model"),
        ("get", "/readyz"), ("get", "/healthz"), ("get", "/peers"),
    }  # fmt: skip
    operations = {(m, p): op for p, ops in schema["paths"].items() for m, op in ops.items()}
    assert expected_routes <= set(operations)
    for (method, path), op in operations.items():
        assert op.get("summary"), (method, path)
        if path in public:
            assert not op.get("security"), path
        else:
            assert op["security"] == [{"BearerToken": []}], path
            assert "401" in op["responses"], path
        for status, response in op["responses"].items():
            if int(status) >= 400:
                content = response["content"]
                assert "application/problem+json" in content, (method, path, status)
    assert "404" in operations[("get", "/sessions/{session_id}")]["responses"]
    assert "409" in operations[("post", "/sessions/{session_id}/cancel")]["responses"]
    cancelled = operations[("post", "/sessions/{session_id}/cancel")]["responses"]["202"]["content"]
    assert cancelled["application/json"]["schema"]["$ref"].endswith("/SessionCancelRequested")
    assert "429" in operations[("post", "/auth/signin")]["responses"]
    assert "413" in operations[("post", "/datasets")]["responses"]
    assert "text/event-stream" in operations[("get", "/sessions/{session_id}/stream")]["responses"]["200"]["content"]
