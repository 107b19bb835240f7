"""P4 start latency: ``POST /sessions`` until every assigned peer has received its ``Train``.

Real nats-server, PostgreSQL, projector, scheduler and gateway processes; light fake peers (one
durable command consumer each, fetched and acked as the real peer does; they answer ``Train`` with
an instant ``PeerDone`` so the session completes and the peers come free again).

A (platform): wait until the read models show enough idle peers, then time ``POST /sessions`` (a
sweep on ``PEERS_PER_SESSION`` peers) to the last of its peers' ``Train`` arrivals.
B (floor): the same chain with no service logic in between, from this process: one HTTP round trip
to the gateway (``/healthz``), the appends the scheduler makes one after the other (the request, a
lock per peer, the start; to a scratch stream) and one ``Train`` per peer to the same fake peers,
until the last arrives. A and B alternate, ``SESSIONS`` of each.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import nats
from nats.js import api

from bench._common import Report, Stack, cli_output, percentile, signup, upload_dataset, wait_idle_peers
from bench._fakepeers import FakeSwarm
from swarmtrain.common import bus
from swarmtrain.common.events import Hyperparameters, ModelSpec, Train, new_id

SESSIONS, PEERS, PEERS_PER_SESSION = 50, 4, 2
SCRATCH = "BENCHFLOOR"


async def floor_once(
    client: httpx.AsyncClient, js: nats.js.JetStreamContext, swarm: FakeSwarm, peers: list[str]
) -> float:
    sid = new_id()
    swarm.no_reply.add(sid)
    t0 = time.perf_counter()
    (await client.get("/healthz")).raise_for_status()
    for i in range(len(peers) + 2):
        await js.publish(f"bench.{sid}.{i}", b"{}", headers={"Nats-Msg-Id": f"{sid}.{i}"}, stream=SCRATCH)
    hp = Hyperparameters(epochs=1, batch_size=32, lr=0.01)
    for peer_id in peers:
        train = Train(
            peer_id=peer_id, session_id=sid, dataset_uri="file:///d.csv", dataset_sha256="0" * 64,
            label_column="label", model=ModelSpec(), hyperparameters=hp, validation_split=0.2, seed=0,
            output_uri="file:///m",
        )  # fmt: skip
        await bus.send(js, train)
    arrivals = await swarm.wait_trains(sid, len(peers))
    return max(arrivals) - t0


async def main() -> Report:
    report = Report("P4 start")
    with Stack("p4") as st:
        st.start("projector")
        st.start("scheduler")
        st.start("gateway")
        st.wait_gateway()
        st.wait_log("scheduler", "state rebuilt")
        nc = await nats.connect(st.nats_url)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        await js.add_stream(api.StreamConfig(name=SCRATCH, subjects=["bench.>"], storage=api.StorageType.FILE))
        swarm = FakeSwarm(nc, PEERS, mode="durable")
        await swarm.start()
        platform: list[float] = []
        floor: list[float] = []
        async with httpx.AsyncClient(base_url=st.gateway_url, timeout=30) as client:
            await signup(client)
            dataset_id = await upload_dataset(client)
            body = {
                "dataset_id": dataset_id,
                "num_peers": PEERS_PER_SESSION,
                "hyperparameters": {"epochs": 1, "batch_size": 32, "lr": 0.01},
            }
            for i in range(SESSIONS + 1):
                await wait_idle_peers(st.database_url, PEERS_PER_SESSION)
                t0 = time.perf_counter()
                resp = await client.post("/sessions", json=body)
                if resp.status_code != 201:
                    raise RuntimeError(f"POST /sessions: {resp.status_code} {resp.text[:300]}")
                arrivals = await swarm.wait_trains(resp.json()["session_id"], PEERS_PER_SESSION)
                floor_s = await floor_once(client, js, swarm, swarm.peer_ids[:PEERS_PER_SESSION])
                if i:  # the first pair warms both paths up
                    platform.append(max(arrivals) - t0)
                    floor.append(floor_s)
        await swarm.close()
        rss = st.rss()
        await nc.drain()
    ms = 1000.0
    ref = percentile(floor, 50) * ms
    row = report.add(
        "p50 POST -> all Train received",
        percentile(platform, 50) * ms,
        "ms",
        reference=ref,
        reference_name="floor p50: HTTP RTT + appends + sends",
        target="p50 <= 100 ms",
    )
    row.met = row.value <= 100
    report.add(
        "p99 POST -> all Train received",
        percentile(platform, 99) * ms,
        "ms",
        reference=percentile(floor, 99) * ms,
        reference_name="floor p99",
    )
    report.extra = {
        "sessions": len(platform),
        "peers_per_session": PEERS_PER_SESSION,
        "platform_ms": sorted(round(x * ms, 1) for x in platform),
        "floor_ms": sorted(round(x * ms, 1) for x in floor),
        "rss_mib": rss,
    }
    return report


if __name__ == "__main__":
    asyncio.run(main()).write(cli_output())
