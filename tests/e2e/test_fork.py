"""Lineage end to end on a real stack of three peers: fork a fedavg session at a round (with and
without a peer), start a sweep from its final model (``init_from``), and backtest another
aggregation rule on its recorded rounds. Tiny model, one local epoch a round."""

from __future__ import annotations

import hashlib
from typing import Any

import nats
from nats.js.api import AckPolicy
from safetensors.torch import load

from swarmtrain.common import blob, bus, subjects
from swarmtrain.common.events import (
    Event,
    InitModelPrepared,
    PeerDone,
    RoundAveraged,
    RoundClosed,
    SessionRequested,
    SessionStarted,
    decode_event,
)
from swarmtrain.common.settings import Settings
from swarmtrain.scheduler.recompute import average_without
from swarmtrain.training.averaging import state_bytes
from tests.factories import session_body

from .conftest import Api, Stack, cli

LOCAL = {"epochs": 1, "batch_size": 64, "lr": 0.003}
MODEL = {"kind": "mlp", "hidden": [16]}


async def history(stack: Stack, sid: str) -> list[Event]:
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    sub = await bus.pull_consumer(
        js, bus.EVENTS_STREAM, ack=AckPolicy.NONE, filter_subject=subjects.session_events(sid)
    )
    out: list[Event] = []
    while batch := await bus.fetch(sub, decode_event, batch=1024, timeout=0.5):
        out += [event for _, event in batch]
        if batch[-1][0].metadata.num_pending == 0:
            break
    await sub.unsubscribe()
    await nc.drain()
    return out


def of(events: list[Event], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


async def post(api: Api, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    resp = await api.client.post(path, json=body)
    assert resp.status_code == status, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def test_fork_init_from_and_backtest(stack: Stack, api: Api) -> None:
    peers = sorted(p["peer_id"] for p in await api.wait_idle_peers(3))
    ds = await api.upload()
    parent_body = session_body(ds["dataset_id"], 3, LOCAL, strategy="fedavg", rounds=3, model=MODEL, seed=5)
    parent = (await post(api, "/sessions", parent_body))["session_id"]
    assert (await api.wait_ended(parent))["status"] == "completed"
    events = await history(stack, parent)
    averaged = {e.round: e for e in of(events, RoundAveraged)}
    closed = {e.round: e for e in of(events, RoundClosed)}
    request = of(events, SessionRequested)[0]

    # what a fork recomputes, here in process: round 3 with nothing excluded is round 3, bit for bit
    settings = Settings(blob_url=stack.env["SWARMTRAIN_BLOB_URL"])
    store = blob.open_store(settings.blob_url, settings)
    start = load(store.get_bytes(store.key_of(averaged[2].uri), sha256=averaged[2].sha256))
    same, included = average_without(store, request, closed[3], [], start)
    assert hashlib.sha256(state_bytes(same)).hexdigest() == averaged[3].sha256 and included == peers
    excluded = peers[0]
    without, included = average_without(store, request, closed[3], [excluded], start)
    assert included == peers[1:]

    # a fork at round 3 without a peer: the recomputed round, and no part for that peer
    await api.wait_idle_peers(3)
    body = {"round": 3, "exclude_peers": [excluded], "num_peers": 2}
    fork = (await post(api, f"/sessions/{parent}/fork", body))["session_id"]
    done = await api.wait_ended(fork)
    assert done["status"] == "completed", done
    assert (done["parent_session_id"], done["parent_round"], done["excluded_peers"]) == (parent, 3, [excluded])
    assert done["rounds"] == 1  # the parent's rounds left after round 3, at least 1
    forked = await history(stack, fork)
    prepared = of(forked, InitModelPrepared)
    assert len(prepared) == 1 and prepared[0].included == peers[1:]
    assert prepared[0].sha256 == hashlib.sha256(state_bytes(without)).hexdigest()
    assert prepared[0].uri.endswith(f"/sessions/{fork}/init/start.safetensors")
    started = of(forked, SessionStarted)[0]
    assert started.init_sha256 == prepared[0].sha256 and excluded not in started.assignments
    assert all(u.peer_id != excluded for c in of(forked, RoundClosed) for u in c.updates)

    # a fork at round 3 with everyone: exactly round 3's stored average
    await api.wait_idle_peers(3)
    whole = (await post(api, f"/sessions/{parent}/fork", {"round": 3, "rounds": 1, "num_peers": 1}))["session_id"]
    done = await api.wait_ended(whole)
    assert done["status"] == "completed", done
    assert of(await history(stack, whole), SessionStarted)[0].init_sha256 == averaged[3].sha256

    # a sweep from the parent's final model (fine-tuning)
    await api.wait_idle_peers(3)
    sweep_body = session_body(ds["dataset_id"], 2, LOCAL, model=MODEL, init_from={"session_id": parent})
    sweep = (await post(api, "/sessions", sweep_body))["session_id"]
    done = await api.wait_ended(sweep)
    assert done["status"] == "completed", done
    assert (done["parent_session_id"], done["parent_round"]) == (parent, None)
    final = {e.model_sha256 for e in of(events, PeerDone)}
    assert {of(await history(stack, sweep), SessionStarted)[0].init_sha256} == final

    rc, out, err = await cli("session", "backtest", parent, "--aggregator", "median", env=stack.env)
    assert rc == 0, out + err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"] and all(r[1] == "3" for r in rows), out
    assert "not a retraining" in out


async def test_lineage_is_the_owners_only_and_shapes_must_fit(stack: Stack, api: Api) -> None:
    await api.wait_idle_peers(3)
    ds = await api.upload()
    body = {"dataset_id": ds["dataset_id"], "num_peers": 1, "model": MODEL, "hyperparameters": LOCAL}
    mine = (await post(api, "/sessions", body))["session_id"]
    await api.wait_ended(mine)
    other = Api(stack.url)
    try:
        await other.signup()
        theirs = await other.upload()
        stranger = {**body, "dataset_id": theirs["dataset_id"], "init_from": {"session_id": mine}}
        await post(other, "/sessions", stranger, status=404)
        await post(other, f"/sessions/{mine}/fork", {"round": 1}, status=404)
    finally:
        await other.client.aclose()
    await post(api, "/sessions", {**body, "model": {"hidden": [8]}, "init_from": {"session_id": mine}}, 400)
    await post(api, f"/sessions/{mine}/fork", {"round": 1}, status=400)  # a sweep has no rounds
