"""GET /sessions/{id}/stream: Server-Sent Events over real HTTP (uvicorn on a free port), read as
``curl -N`` would, against real NATS, PostgreSQL and the projector."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext

from swarmtrain.common import bus
from swarmtrain.common.events import Heartbeat, Hyperparameters, PeerDone, SessionCompleted, SessionStarted
from swarmtrain.common.settings import Settings
from tests.factories import session_body
from tests.gateway.conftest import Append, OnlinePeers
from tests.gateway.helpers import HP, Headers, live, sign_up_and_in, small_csv, sse_frames, upload
from tests.support import wait_for

pytestmark = pytest.mark.timeout(60)


class Live(msgspec.Struct):
    http: httpx.AsyncClient
    alice: Headers
    bob: Headers
    dataset_id: str


@pytest.fixture
async def served(settings: Settings, projector: None, online_peers: OnlinePeers) -> AsyncIterator[Live]:
    settings = msgspec.structs.replace(settings, max_streams_per_user=2)
    async with live(settings) as base, httpx.AsyncClient(base_url=base, timeout=20) as http:
        alice = await sign_up_and_in(http, "alice@example.com")
        bob = await sign_up_and_in(http, "bob@example.com")
        dataset_id = (await upload(http, alice, small_csv(rows=40))).json()["dataset_id"]
        await online_peers(2)
        yield Live(http=http, alice=alice, bob=bob, dataset_id=dataset_id)


async def new_session(s: Live) -> str:
    body = session_body(s.dataset_id, 2, HP)
    r = await s.http.post("/sessions", json=body, headers=s.alice)
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


def beat(sid: str, peer: str, epoch: int) -> Heartbeat:
    return Heartbeat(session_id=sid, peer_id=peer, epoch=epoch, epochs=2, loss=0.5, accuracy=0.5, samples_per_s=9.0)


async def consumers(js: JetStreamContext) -> int:
    return int((await js.stream_info(bus.EVENTS_STREAM)).state.consumer_count)


async def test_history_then_live_events_until_the_session_ends(served: Live, append: Append, js: Any) -> None:
    s = served
    baseline = await consumers(js)  # the projector's
    sid = await new_session(s)
    hp = Hyperparameters(**HP)
    await append(SessionStarted(session_id=sid, assignments={"peer0": hp, "peer1": hp}), beat(sid, "peer0", 1))
    frames: list[dict[str, str]] = []
    async with s.http.stream("GET", f"/sessions/{sid}/stream", headers=s.alice) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for frame in sse_frames(r):
            frames.append(frame)
            if len(frames) == 3:  # the history is in: now the session goes on, live
                await append(
                    beat(sid, "peer1", 1),
                    PeerDone(session_id=sid, peer_id="peer0", model_uri="file:///m", model_sha256="0", epochs=2,
                             loss=0.1, accuracy=0.9, val_accuracy=0.8, train_seconds=1.0),
                    SessionCompleted(session_id=sid, best_peer_id="peer0", best_val_accuracy=0.8, model_uri="file:///m"),
                    beat(sid, "peer1", 2),  # a straggler after the end: not sent
                )  # fmt: skip
    assert [f["event"] for f in frames] == [
        "SessionRequested",
        "SessionStarted",
        "Heartbeat",
        "Heartbeat",
        "PeerDone",
        "SessionCompleted",
    ]
    ids = [int(f["id"]) for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    events = [json.loads(f["data"]) for f in frames]
    assert all(e["session_id"] == sid for e in events)
    assert [e["type"] for e in events] == [f["event"] for f in frames]
    assert events[2]["peer_id"] == "peer0" and events[3]["peer_id"] == "peer1"

    # resuming after an event gives the rest, and an ended session's stream ends at once
    async with s.http.stream("GET", f"/sessions/{sid}/stream", headers={**s.alice, "Last-Event-ID": str(ids[3])}) as r:
        rest = [f["event"] async for f in sse_frames(r)]
    assert rest == ["PeerDone", "SessionCompleted"]
    async with s.http.stream("GET", f"/sessions/{sid}/stream", params={"after": ids[4]}, headers=s.alice) as r:
        assert [f["event"] async for f in sse_frames(r)] == ["SessionCompleted"]
    assert await consumers(js) == baseline  # every reader deleted its consumer


async def test_a_client_that_hangs_up_frees_its_stream(served: Live, js: Any) -> None:
    s = served
    baseline = await consumers(js)
    sid = await new_session(s)

    async def first_frame() -> dict[str, str]:
        async with s.http.stream("GET", f"/sessions/{sid}/stream", headers=s.alice) as r:
            async for frame in sse_frames(r):
                return frame  # hang up while the session is still queued
        raise AssertionError("no frame")

    # at most two streams at once (the fixture's setting): hold two open, the third is refused
    holders = [await s.http.send(s.http.build_request("GET", f"/sessions/{sid}/stream", headers=s.alice), stream=True)
               for _ in range(2)]  # fmt: skip
    assert [h.status_code for h in holders] == [200, 200]
    r = await s.http.get(f"/sessions/{sid}/stream", headers=s.alice)
    assert r.status_code == 429 and "at most 2" in r.json()["detail"]
    for h in holders:
        await h.aclose()

    async def consumers_back_to_baseline() -> bool:
        return await consumers(js) == baseline

    # the readers of the hung-up streams deleted theirs
    await wait_for(consumers_back_to_baseline, f"the consumer count to fall back to {baseline}")
    assert await consumers(js) == baseline
    # the hung-up streams were released: more can be opened again, one after another
    for _ in range(3):
        assert (await first_frame())["event"] == "SessionRequested"


async def test_someone_elses_or_no_session_is_404(served: Live) -> None:
    s = served
    sid = await new_session(s)
    for headers, path in ((s.bob, sid), (s.alice, "f" * 32), (s.alice, "../../etc")):
        r = await s.http.get(f"/sessions/{path}/stream", headers=headers)
        assert r.status_code == 404, (path, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    r = await s.http.get(f"/sessions/{sid}/stream", headers={**s.alice, "Last-Event-ID": "not-a-number"})
    assert r.status_code == 400


async def test_shutdown_ends_open_streams(settings: Settings, projector: None, online_peers: OnlinePeers) -> None:
    async with live(settings) as base, httpx.AsyncClient(base_url=base, timeout=20) as http:
        alice = await sign_up_and_in(http, "alice@example.com")
        dataset_id = (await upload(http, alice, small_csv())).json()["dataset_id"]
        await online_peers(1)
        body = session_body(dataset_id, 1, HP)
        sid = (await http.post("/sessions", json=body, headers=alice)).json()["session_id"]
        stream = await http.send(http.build_request("GET", f"/sessions/{sid}/stream", headers=alice), stream=True)
        assert stream.status_code == 200
    # leaving ``live`` stopped the server within its deadline although the stream was open
    await stream.aclose()
