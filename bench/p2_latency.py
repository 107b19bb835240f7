"""P2 event latency: a peer appends a ``Heartbeat``; how long until ``GET /sessions/{id}`` shows it.

Real nats-server, PostgreSQL, projector and gateway processes. The benchmark plays the scheduler
(it appends ``SessionRequested`` and ``SessionStarted`` for one session with one peer) and the peer
(it appends ``Heartbeat``s with a growing ``epoch``, paced at a fixed rate). Two pollers call
``GET /sessions/{id}`` back to back; heartbeat k is visible at the arrival of the first response
whose epoch is >= k, so a latency is an upper bound by at most one GET.

First a ramp finds the highest rate the projection keeps up with (achieved append rate >= 95 % of
the asked one, and caught up within 250 ms of the step's end). Then windows at 100 events/s (A)
and at that rate (B) alternate, A B A B A B. The reference (the floor) is what the same path costs
with nothing in between: the median append round trip (publish -> JetStream ack) plus the median
GET round trip, both measured in the same windows.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import nats
from nats.js import JetStreamContext

from bench._common import Report, Stack, cli_output, median, percentile, signup
from swarmtrain.common import bus
from swarmtrain.common.events import Heartbeat, Hyperparameters, ModelSpec, SessionRequested, SessionStarted, new_id

RAMP = (250, 500, 1000, 2000, 4000, 8000)
RAMP_S = 1.5
WINDOWS, LOW_RATE, LOW_S, HIGH_S = 3, 100, 3.0, 2.0
POLLERS = 2
PEER = "p00000000000000b1"


class Probe:
    """Appends heartbeats at a rate and watches them appear through the gateway."""

    def __init__(self, js: JetStreamContext, client: httpx.AsyncClient, sid: str) -> None:
        self.js, self.client, self.sid = js, client, sid
        self.epoch = 0
        self.sent: dict[int, float] = {}
        self.visible: dict[int, float] = {}
        self.seen = 0
        self.append_rtt: list[float] = []
        self.get_rtt: list[float] = []
        self.polling = True

    async def _append(self, epoch: int) -> None:
        beat = Heartbeat(
            session_id=self.sid, peer_id=PEER, epoch=epoch, epochs=10**9, loss=1.0, accuracy=0.5, samples_per_s=1.0
        )
        t = time.perf_counter()
        self.sent[epoch] = t
        await bus.append(self.js, beat)
        self.append_rtt.append(time.perf_counter() - t)

    async def poll(self) -> None:
        while self.polling:
            t = time.perf_counter()
            resp = await self.client.get(f"/sessions/{self.sid}")
            now = time.perf_counter()
            self.get_rtt.append(now - t)
            peers = resp.json()["peers"]
            epoch = int(peers[0]["epoch"]) if peers else 0
            if epoch > self.seen:
                for k in range(self.seen + 1, epoch + 1):
                    self.visible[k] = now
                self.seen = epoch

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
        """Seconds until every appended heartbeat is visible."""
        t = time.perf_counter()
        while self.seen < self.epoch:
            if time.perf_counter() - t > timeout:
                raise RuntimeError(f"projection stuck at epoch {self.seen} of {self.epoch}")
            await asyncio.sleep(0.002)
        return time.perf_counter() - t

    def latencies(self, epochs: list[int]) -> list[float]:
        return [self.visible[k] - self.sent[k] for k in epochs]


async def main() -> Report:
    report = Report("P2 latency")
    with Stack("p2") as st:
        st.start("projector")
        st.start("gateway")
        st.wait_gateway()
        nc = await nats.connect(st.nats_url)
        js = nc.jetstream()
        limits = httpx.Limits(max_connections=POLLERS + 2)
        async with httpx.AsyncClient(base_url=st.gateway_url, timeout=30, limits=limits) as client:
            user_id = await signup(client)
            sid = new_id()
            hp = Hyperparameters(epochs=10**9, batch_size=32, lr=0.01)
            request = SessionRequested(
                session_id=sid, owner_id=user_id, dataset_id="d", dataset_uri="file:///d.csv",
                dataset_sha256="0" * 64, label_column="label", num_peers=1, model=ModelSpec(), hyperparameters=[hp],
            )  # fmt: skip
            await bus.append(js, request)
            await bus.append(js, SessionStarted(session_id=sid, assignments={PEER: hp}))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                resp = await client.get(f"/sessions/{sid}")
                if resp.status_code == 200 and resp.json()["peers"]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"the session never showed: {resp.status_code} {resp.text[:200]}")

            probe = Probe(js, client, sid)
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

            low: list[float] = []
            high: list[float] = []
            low_floor: list[float] = []
            high_floor: list[float] = []
            high_achieved: list[float] = []
            windows: list[tuple[float, float, list[float], list[float]]] = [
                (LOW_RATE, LOW_S, low, low_floor),
                (sustained, HIGH_S, high, high_floor),
            ]
            for _ in range(WINDOWS):
                for rate, seconds, out, floors in windows:
                    probe.append_rtt, probe.get_rtt = [], []
                    epochs, achieved = await probe.pace(rate, seconds)
                    await probe.settle()
                    out += probe.latencies(epochs)
                    floors.append(median(probe.append_rtt) + median(probe.get_rtt))
                    if rate == sustained:
                        high_achieved.append(achieved)
            probe.polling = False
            await asyncio.gather(*pollers)
        await nc.drain()

    ms = 1000.0
    for label, values, floor in (
        (f"{LOW_RATE} ev/s", low, low_floor),
        (f"{sustained:,.0f} ev/s (highest sustained)", high, high_floor),
    ):
        reference = median(floor) * ms
        row = report.add(
            f"p50 @ {label}",
            percentile(values, 50) * ms,
            "ms",
            reference=reference,
            reference_name="append RTT + GET RTT",
        )
        row = report.add(
            f"p99 @ {label}",
            percentile(values, 99) * ms,
            "ms",
            reference=reference,
            reference_name="append RTT + GET RTT",
            target="p99 <= 25 ms",
        )
        row.met = row.value <= 25.0
    report.extra = {
        "ramp": ramp,
        "sustained_rate": sustained,
        "high_achieved_rates": high_achieved,
        "samples": {"low": len(low), "high": len(high)},
        "floor_ms": {"low": [f * ms for f in low_floor], "high": [f * ms for f in high_floor]},
        "max_ms": {"low": max(low) * ms, "high": max(high) * ms},
    }
    return report


if __name__ == "__main__":
    asyncio.run(main()).write(cli_output())
