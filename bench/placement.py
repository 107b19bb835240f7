"""Placement at swarm scale: 1,000 simulated peers of mixed specs, 100 sessions of mixed requirements.

Only the pure rules run here (``swarmtrain.scheduler.placement.plan``), in simulated time: sessions
arrive over a minute, each trains for a few minutes once placed, and the swarm is too small for all
of them at once, so the queue fills. Every ``plan`` call is timed on the wall clock (the scheduler's
decision cost); waits are in simulated seconds.

Checked on every placement: each peer was idle, is given to one session only, meets the session's
requirements and can hold its model. Reported: GPU share of large-model peers and CPU share of
small-model ones, queue wait p50/p99, plan() p50/p99/max against the P7 target (50 ms).

    python -m bench.placement [--out FILE]
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from dataclasses import dataclass

from bench._common import Report, percentile, show
from swarmtrain.common.specs import GpuSpec, PeerSpecs, QueuePolicy, Requirements
from swarmtrain.scheduler.placement import (
    Expired,
    PeerView,
    Placement,
    Queued,
    Refused,
    Request,
    Rules,
    can_hold,
    is_large,
    matches,
    memory_needed,
    plan,
)

PEERS, SESSIONS, SEED = 1000, 100, 14
GiB = 1 << 30
GPUS = [  # (name, memory, compute capability, share of GPU peers)
    ("Tesla T4", 16 * GiB, "7.5", 0.30),
    ("NVIDIA A10", 24 * GiB, "8.6", 0.25),
    ("NVIDIA A100-SXM4-40GB", 40 * GiB, "8.0", 0.20),
    ("NVIDIA A100-SXM4-80GB", 80 * GiB, "8.0", 0.10),
    ("NVIDIA H100 80GB HBM3", 80 * GiB, "9.0", 0.15),
]
REGIONS = ["eu", "us", "ap"]


def make_peers(rng: random.Random) -> dict[str, PeerSpecs]:
    peers = {}
    for i in range(PEERS):
        labels = {"region": rng.choice(REGIONS)}
        if rng.random() < 0.1:
            labels["tier"] = "spot"
        on_gpu = rng.random() < 0.3
        if on_gpu:
            name, mem, cc, _ = rng.choices(GPUS, weights=[g[3] for g in GPUS])[0]
            gpus = [GpuSpec(name=name, memory_bytes=mem, compute_capability=cc)]
            host = rng.choice([64, 128, 256, 512]) * GiB
        else:
            gpus = []
            host = rng.choice([4, 8, 16, 32, 64, 128, 256]) * GiB
        peers[f"peer-{i:04d}"] = PeerSpecs(
            cpu_cores=rng.choice([2, 4, 8, 16, 32, 64]),
            memory_bytes=host,
            gpus=gpus,
            torch_version="2.5.1",
            cuda_version="12.4" if on_gpu else None,
            os="Linux 6.8 x86_64",
            labels=labels,
            device_index=0 if on_gpu else None,
        )
    return peers


@dataclass
class Job:
    request: Request
    duration: float


def make_jobs(rng: random.Random) -> list[Job]:
    jobs = []
    at = 0.0
    for i in range(SESSIONS):
        at += rng.expovariate(100 / 60)  # 100 sessions over about a minute
        # half below the 1e6 threshold (10k .. 1M), half above (1M .. 2.5e9)
        params = int(10 ** (rng.uniform(4, 6) if rng.random() < 0.5 else rng.uniform(6, 9.4)))
        kind = rng.random()
        if kind < 0.45:
            requirements = Requirements()
        elif kind < 0.65:
            requirements = Requirements(device="cuda")
        elif kind < 0.75:
            requirements = Requirements(device="cuda", min_gpu_memory_bytes=40 * GiB)
        elif kind < 0.85:
            requirements = Requirements(device="cpu", min_memory_bytes=16 * GiB)
        else:
            requirements = Requirements(labels={"region": rng.choice(REGIONS)})
        mode = rng.random()
        policy = (
            QueuePolicy(queue=True, priority=rng.choices([0, 1, -1], weights=[8, 1, 1])[0])
            if mode < 0.7
            else QueuePolicy(queue_timeout_s=rng.choice([60.0, 300.0]))
            if mode < 0.9
            else QueuePolicy()
        )
        peers = rng.choice([1, 2, 4, 8, 16, 24, 32, 48])
        request = Request(
            session_id=f"s{i:03d}",
            num_peers=peers,
            param_count=params,
            requested_at=at,
            order=i,
            requirements=requirements,
            policy=policy,
            data_bytes=rng.choice([1, 10, 100, 500]) << 20,
        )
        jobs.append(Job(request, duration=rng.uniform(60, 600)))
    return jobs


def main() -> Report:
    rng = random.Random(SEED)
    specs = make_peers(rng)
    jobs = {j.request.session_id: j for j in make_jobs(rng)}
    rules = Rules()
    busy: dict[str, str] = {}  # peer -> session
    queue: dict[str, Request] = {}
    events: list[tuple[float, int, str, str]] = []  # (time, tiebreak, kind, session)
    tick = 0
    for j in jobs.values():
        heapq.heappush(events, (j.request.requested_at, tick := tick + 1, "arrive", j.request.session_id))
        if (t := j.request.policy.queue_timeout_s) is not None:
            heapq.heappush(events, (j.request.requested_at + t, tick := tick + 1, "deadline", j.request.session_id))
    waits: list[float] = []
    decide_s: list[float] = []
    outcome: Counter[str] = Counter()
    share = {k: Counter[str]() for k in ("large", "small", "large, device any", "small, device any")}
    violations: list[str] = []
    fill_ins = preference_misses = 0
    longest_queue = 0
    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            _, _, kind, sid = heapq.heappop(events)
            if kind == "arrive":
                queue[sid] = jobs[sid].request
            elif kind == "done":
                for peer in [p for p, s in busy.items() if s == sid]:
                    del busy[peer]
        if not queue:
            continue
        longest_queue = max(longest_queue, len(queue))
        views = [PeerView(p, s, idle=p not in busy) for p, s in specs.items()]
        started = time.perf_counter()
        decisions = plan(list(queue.values()), views, now, rules)
        decide_s.append(time.perf_counter() - started)
        still = [queue[d.session_id] for d in decisions if isinstance(d, Queued)]
        for d in decisions:
            request = queue.pop(d.session_id) if not isinstance(d, Queued) else queue[d.session_id]
            if isinstance(d, Placement):
                need = memory_needed(request.param_count, request.data_bytes, rules.memory)
                for peer in d.peer_ids:
                    s = specs[peer]
                    if peer in busy:
                        violations.append(f"{d.session_id}: {peer} was not idle")
                    if not matches(s, request.requirements):
                        violations.append(f"{d.session_id}: {peer} does not meet {request.requirements}")
                    if not can_hold(s, need):
                        violations.append(f"{d.session_id}: {peer} cannot hold {need} bytes")
                    busy[peer] = d.session_id
                large = is_large(request.param_count, rules)
                kinds = Counter("cuda" if specs[p].device_index is not None else "cpu" for p in d.peer_ids)
                share["large" if large else "small"].update(kinds)
                if request.requirements.device == "any":  # where the preference, not a requirement, chose
                    share["large, device any" if large else "small, device any"].update(kinds)
                preferred = "cuda" if large else "cpu"
                if kinds[preferred] < len(d.peer_ids):
                    fill_ins += 1
                    # a preferred peer left idle that no waiting request could use is a preference miss
                    for p, s in specs.items():
                        if p in busy or (s.device_index is not None) != (preferred == "cuda"):
                            continue
                        if matches(s, request.requirements) and can_hold(s, need):
                            wanted = any(
                                matches(s, q.requirements)
                                and can_hold(s, memory_needed(q.param_count, q.data_bytes, rules.memory))
                                for q in still
                            )
                            if not wanted:
                                preference_misses += 1
                                break
                waits.append(now - request.requested_at)
                outcome["placed"] += 1
                heapq.heappush(events, (now + jobs[d.session_id].duration, tick := tick + 1, "done", d.session_id))
            elif isinstance(d, Refused):
                outcome["refused (no queue)"] += 1
            elif isinstance(d, Expired):
                outcome["expired (queue_timeout_s)"] += 1
    outcome["never placed (queued, nobody matches)"] = len(queue)
    if len(set(p for p in busy)) != len(busy):
        violations.append("a peer held twice")

    ms = 1000.0
    report = Report("placement")
    row = report.add("plan() p99, 1,000 peers", percentile(decide_s, 99) * ms, "ms", target="p99 <= 50 ms (P7)")
    row.met = row.value <= 50
    report.add("plan() p50, 1,000 peers", percentile(decide_s, 50) * ms, "ms")
    report.add("plan() max", max(decide_s) * ms, "ms")
    report.add("queue wait p50 (simulated)", percentile(waits, 50), "s")
    report.add("queue wait p99 (simulated)", percentile(waits, 99), "s")
    row = report.add("placements breaking requirements or capacity", len(violations), "", target="0")
    row.met = not violations

    def pct(part: float, whole: float) -> float:
        return 100 * part / max(1, whole)

    for scope in ("large, device any", "large"):
        report.add(f"GPU share of peers for {scope}", pct(share[scope]["cuda"], sum(share[scope].values())), "%")
    for scope in ("small, device any", "small"):
        report.add(f"CPU share of peers for {scope}", pct(share[scope]["cpu"], sum(share[scope].values())), "%")
    gpu_to_large = pct(share["large"]["cuda"], share["large"]["cuda"] + share["small"]["cuda"])
    report.add("GPU peer assignments that went to large models", gpu_to_large, "%")
    row = report.add("preferred kind left idle while the other filled in", preference_misses, "", target="0")
    row.met = preference_misses == 0
    gpu_peers = sum(1 for s in specs.values() if s.device_index is not None)
    report.extra = {
        "peers": {"total": PEERS, "gpu": gpu_peers, "cpu": PEERS - gpu_peers},
        "sessions": SESSIONS,
        "outcomes": dict(outcome),
        "plan_calls": len(decide_s),
        "longest_queue": longest_queue,
        "fill_ins": fill_ins,
        "peer_share": {k: dict(v) for k, v in share.items()},
        "violations": violations[:10],
        "large_model_params": rules.large_model_params,
    }
    return report


if __name__ == "__main__":
    show(main())
