"""P2 event latency: a peer reports a ``Heartbeat``; how long until ``GET /sessions/{id}`` shows it,
and (the trust hop) how long until the scheduler has appended its fact.

Real nats-server, PostgreSQL, projector, scheduler and gateway processes. One session is requested
through the gateway (``POST /sessions``, a sweep on ``PEERS`` peers) and started by the scheduler
on light fake peers (``bench._fakepeers``) that take their ``Train`` and never answer it. The
benchmark then plays those peers: it publishes ``Heartbeat`` reports with a growing ``epoch`` on
``peer.<id>.reports`` (``bus.report``), paced at a fixed rate, round robin over the peers (a run
trains at most 1,000 epochs); the scheduler checks each one and
appends the fact, the projector applies it, the gateway shows it. Two pollers call
``GET /sessions/{id}`` back to back; heartbeat k is visible at the arrival of the first response
whose epoch is >= k, so a latency is an upper bound by at most one GET. A core subscription on
``session.<id>.events`` times each fact's arrival: report published -> fact appended is the
trust hop. Each beat's way is split further, into the projector's hop (fact seen -> the
projector's commit that holds it: its ``NOTIFY``, then one read of ``session_peers``) and the
gateway's (that commit -> visible in a GET), in the report's ``steps_ms_p50_p99``.

First a ramp finds the highest rate the path keeps up with (achieved report rate >= 95 % of the
asked one, and caught up within 250 ms of the step's end). Then windows at 100 reports/s (A), at
1,000 reports/s (C) and at that rate (B) alternate, A C B A C B A C B. The reference (the floor) is
what the same path costs with nothing in between: the median report round trip (publish ->
JetStream ack) plus the median GET round trip, both measured in the same windows.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bench._common import ROOT, Report, Stack, cli_output, median, percentile, quick, signup, upload_dataset
from bench._fakepeers import FakeSwarm
from swarmtrain.common import bus
from swarmtrain.common.events import Heartbeat, decode_event
from swarmtrain.projector.projection import CHANNEL

RAMP = (250, 1000) if quick() else (250, 500, 1000, 2000, 4000, 8000)
RAMP_S = 0.5 if quick() else 1.5
WINDOWS, LOW_RATE, MID_RATE, LOW_S, HIGH_S = (1, 100, 1000, 1.0, 0.5) if quick() else (3, 100, 1000, 3.0, 1.5)
POLLERS = 2
PEERS = 4 if quick() else 80
EPOCHS = 1000
"""A run's epochs: the most the gateway allows; so a peer reports at most this many heartbeats."""


class Probe:
    """Reports heartbeats at a rate, spread over the session's peers (heartbeat k is peer
    ``(k - 1) % N``'s epoch ``(k - 1) // N + 1``: a run trains at most ``EPOCHS``), and watches
    their facts on the bus and the beats appear through the gateway."""

    def __init__(self, js: JetStreamContext, client: httpx.AsyncClient, sid: str, peer_ids: list[str]) -> None:
        self.js, self.client, self.sid, self.peer_ids = js, client, sid, peer_ids
        self.index = {p: i for i, p in enumerate(peer_ids)}
        self.epoch = 0
        """Heartbeats reported so far (k = 1..epoch)."""
        self.sent: dict[int, float] = {}
        self.visible: dict[int, float] = {}
        self.shown = [0] * len(peer_ids)
        """Each peer's epoch as the gateway last showed it."""
        self.appended: dict[int, float] = {}
        """k -> when its fact was seen on ``session.<id>.events``."""
        self.committed: dict[int, float] = {}
        """k -> when the projector's commit that holds it was seen (its ``NOTIFY``, then a read of
        ``session_peers``: an upper bound by one query)."""
        self._looking = False
        self._again = False
        self.append_rtt: list[float] = []
        self.get_rtt: list[float] = []
        self.polling = True

    def k(self, peer: int, epoch: int) -> int:
        return (epoch - 1) * len(self.peer_ids) + peer + 1

    async def on_fact(self, msg: Msg) -> None:
        now = time.perf_counter()
        event = decode_event(msg.data)
        if isinstance(event, Heartbeat) and event.peer_id in self.index:
            self.appended.setdefault(self.k(self.index[event.peer_id], event.epoch), now)

    def on_notify(self, conn: asyncpg.Connection) -> None:
        """The projector committed a batch: read the peers' epochs (one read at a time; a commit
        that comes meanwhile is read by the next)."""
        if self._looking:
            self._again = True
            return
        self._looking = True
        asyncio.get_running_loop().create_task(self._look(conn))

    async def _look(self, conn: asyncpg.Connection) -> None:
        try:
            while True:
                self._again = False
                rows = await conn.fetch("SELECT peer_id, epoch FROM session_peers WHERE session_id = $1", self.sid)
                now = time.perf_counter()
                for row in rows:
                    i = self.index.get(row["peer_id"])
                    if i is not None:
                        for e in range(1, int(row["epoch"] or 0) + 1):
                            self.committed.setdefault(self.k(i, e), now)
                if not self._again:
                    return
        finally:
            self._looking = False

    async def _append(self, k: int) -> None:
        n = len(self.peer_ids)
        peer, epoch = (k - 1) % n, (k - 1) // n + 1
        if epoch > EPOCHS:
            raise RuntimeError(f"more than {EPOCHS * n} heartbeats: more peers or shorter windows")
        peer_id = self.peer_ids[peer]
        beat = Heartbeat(
            event_id=f"{self.sid}.{peer_id}.beat.{epoch}",
            session_id=self.sid,
            peer_id=peer_id,
            epoch=epoch,
            epochs=EPOCHS,
            loss=1.0,
            accuracy=0.5,
            samples_per_s=1.0,
        )
        t = time.perf_counter()
        self.sent[k] = t
        await bus.report(self.js, beat)
        self.append_rtt.append(time.perf_counter() - t)

    async def poll(self) -> None:
        while self.polling:
            t = time.perf_counter()
            resp = await self.client.get(f"/sessions/{self.sid}")
            now = time.perf_counter()
            self.get_rtt.append(now - t)
            for row in resp.json()["peers"]:
                i = self.index.get(row["peer_id"])
                if i is None:
                    continue
                epoch = int(row["epoch"] or 0)
                for e in range(self.shown[i] + 1, epoch + 1):
                    self.visible.setdefault(self.k(i, e), now)
                self.shown[i] = max(self.shown[i], epoch)

    async def pace(self, rate: float, seconds: float) -> tuple[list[int], float]:
        """Append at ``rate``/s for ``seconds``, in ticks of 10 ms; returns (epochs, achieved rate)."""
        tick = 0.01
        per_tick = rate * tick
        due = 0.0
        epochs: list[int] = []
        start = time.perf_counter()
        next_tick = start
        while (now := time.perf_counter()) - start < seconds:
            due += per_tick
            batch = []
            while due >= 1:
                self.epoch += 1
                batch.append(self.epoch)
                due -= 1
            if batch:
                await asyncio.gather(*(self._append(k) for k in batch))
                epochs += batch
            next_tick += tick
            await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
        return epochs, len(epochs) / (now - start)

    async def settle(self, timeout: float = 30.0) -> float:
        """Seconds until every reported heartbeat is visible."""
        t = time.perf_counter()
        while len(self.visible) < self.epoch:
            if time.perf_counter() - t > timeout:
                raise RuntimeError(f"projection stuck: {len(self.visible)} of {self.epoch} heartbeats visible")
            await asyncio.sleep(0.002)
        return time.perf_counter() - t

    def latencies(self, epochs: list[int]) -> list[float]:
        return [self.visible[k] - self.sent[k] for k in epochs]

    def projected(self, epochs: list[int]) -> list[float]:
        """Fact seen on the bus -> committed by the projector (its fetch, apply, commit)."""
        return [self.committed[k] - self.appended[k] for k in epochs if k in self.committed and k in self.appended]

    def shown_after(self, epochs: list[int]) -> list[float]:
        """Committed -> visible through ``GET /sessions/{id}`` (the pollers and the gateway's read)."""
        return [max(0.0, self.visible[k] - self.committed[k]) for k in epochs if k in self.committed]

    def hops(self, epochs: list[int]) -> list[float]:
        """Report published -> its fact seen on the bus (the scheduler's check and append)."""
        return [self.appended[k] - self.sent[k] for k in epochs if k in self.appended]


async def main() -> Report:
    report = Report("P2 latency")
    with Stack("p2") as st:
        st.start("projector")
        st.start("scheduler")
        st.start("gateway")
        st.wait_gateway()
        st.wait_log("scheduler", "state rebuilt")
        nc = await nats.connect(st.nats_url)
        js = nc.jetstream()
        await bus.ensure_streams(js)
        swarm = FakeSwarm(nc, PEERS, mode="core", answer=False)
        await swarm.start()
        limits = httpx.Limits(max_connections=POLLERS + 2)
        async with httpx.AsyncClient(base_url=st.gateway_url, timeout=30, limits=limits) as client:
            await signup(client)
            dataset_id = await upload_dataset(client, ROOT / "examples" / "digits.csv")
            body = {
                "dataset_id": dataset_id,
                "num_peers": PEERS,
                "hyperparameters": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.01},
                "queue": True,
            }
            resp = await client.post("/sessions", json=body)
            if resp.status_code != 201:
                raise RuntimeError(f"POST /sessions: {resp.status_code} {resp.text[:300]}")
            sid = resp.json()["session_id"]
            await swarm.wait_trains(sid, PEERS, timeout=60)

            probe = Probe(js, client, sid, swarm.peer_ids)
            facts = await nc.subscribe(f"session.{sid}.events", cb=probe.on_fact)
            listener = await asyncpg.connect(st.database_url)
            await listener.add_listener(CHANNEL, lambda conn, *_: probe.on_notify(conn))
            pollers = [asyncio.create_task(probe.poll()) for _ in range(POLLERS)]
            await probe.pace(LOW_RATE, 1.0)  # warm-up
            await probe.settle()

            ramp: list[dict[str, float]] = []
            sustained = float(RAMP[0])
            for ramp_rate in RAMP:
                epochs, achieved = await probe.pace(ramp_rate, RAMP_S)
                catch_up = await probe.settle()
                ok = achieved >= 0.95 * ramp_rate and catch_up <= 0.25
                ramp.append({"asked": ramp_rate, "achieved": achieved, "catch_up_s": catch_up, "kept_up": ok})
                if not ok:
                    break
                sustained = float(ramp_rate)

            rates = {"low": float(LOW_RATE), "mid": float(MID_RATE), "high": sustained}
            seconds = {"low": LOW_S, "mid": HIGH_S, "high": HIGH_S}
            seen: dict[str, list[float]] = {k: [] for k in rates}
            hop: dict[str, list[float]] = {k: [] for k in rates}
            projected: dict[str, list[float]] = {k: [] for k in rates}
            shown: dict[str, list[float]] = {k: [] for k in rates}
            floors: dict[str, list[float]] = {k: [] for k in rates}
            achieved_rates: dict[str, list[float]] = {k: [] for k in rates}
            for _ in range(WINDOWS):
                for key, rate in rates.items():
                    probe.append_rtt, probe.get_rtt = [], []
                    epochs, achieved = await probe.pace(rate, seconds[key])
                    await probe.settle()
                    seen[key] += probe.latencies(epochs)
                    hop[key] += probe.hops(epochs)
                    projected[key] += probe.projected(epochs)
                    shown[key] += probe.shown_after(epochs)
                    floors[key].append(median(probe.append_rtt) + median(probe.get_rtt))
                    achieved_rates[key].append(achieved)
            probe.polling = False
            await asyncio.gather(*pollers)
            await facts.unsubscribe()
            await listener.close()
        await swarm.close()
        await nc.drain()

    ms = 1000.0
    labels = {
        "low": f"{LOW_RATE} ev/s",
        "mid": f"{MID_RATE:,} ev/s",
        "high": f"{sustained:,.0f} ev/s (highest sustained)",
    }
    for key, label in labels.items():
        reference = median(floors[key]) * ms
        report.add(
            f"p50 @ {label}",
            percentile(seen[key], 50) * ms,
            "ms",
            reference=reference,
            reference_name="report RTT + GET RTT",
        )
        row = report.add(
            f"p99 @ {label}",
            percentile(seen[key], 99) * ms,
            "ms",
            reference=reference,
            reference_name="report RTT + GET RTT",
            target="p99 <= 25 ms" if key == "low" else "",
        )
        if key == "low":
            row.met = row.value <= 25.0
    for key in ("low", "mid"):
        rtt = median(floors[key]) * ms
        report.add(
            f"trust hop p50 @ {labels[key]}",
            percentile(hop[key], 50) * ms,
            "ms",
            reference=rtt,
            reference_name="report RTT + GET RTT",
            note="report published -> fact appended by the scheduler",
        )
        report.add(
            f"trust hop p99 @ {labels[key]}",
            percentile(hop[key], 99) * ms,
            "ms",
            reference=rtt,
            reference_name="report RTT + GET RTT",
        )
    for key in ("low",):
        rtt = median(floors[key]) * ms
        report.add(
            f"projector hop p99 @ {labels[key]}",
            percentile(projected[key], 99) * ms,
            "ms",
            reference=rtt,
            reference_name="report RTT + GET RTT",
            note="fact appended -> committed by the projector (its NOTIFY, one read)",
        )
    report.extra = {
        "ramp": ramp,
        "sustained_rate": sustained,
        "achieved_rates": achieved_rates,
        "samples": {k: len(v) for k, v in seen.items()},
        "floor_ms": {k: [f * ms for f in v] for k, v in floors.items()},
        "max_ms": {k: max(v) * ms for k, v in seen.items() if v},
        "steps_ms_p50_p99": {
            labels[k]: {
                "report -> fact appended (trust hop)": [percentile(hop[k], 50) * ms, percentile(hop[k], 99) * ms],
                "fact -> committed by the projector": [
                    percentile(projected[k], 50) * ms,
                    percentile(projected[k], 99) * ms,
                ],
                "committed -> visible in GET": [percentile(shown[k], 50) * ms, percentile(shown[k], 99) * ms],
            }
            for k in rates
            if hop[k] and projected[k] and shown[k]
        },
    }
    return report


if __name__ == "__main__":
    asyncio.run(main()).write(cli_output())
