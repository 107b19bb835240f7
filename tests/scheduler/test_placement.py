"""Placement and queue rules as plain function calls: no broker, no clock but the one passed in."""

from __future__ import annotations

import msgspec
import pytest

from swarmtrain.common.specs import GpuSpec, PeerSpecs, QueuePolicy, Requirements
from swarmtrain.scheduler.placement import (
    Expired,
    MemoryModel,
    PeerView,
    Placement,
    Queued,
    Refused,
    Request,
    Rules,
    can_hold,
    cancel,
    expired,
    matches,
    memory_needed,
    plan,
    positions,
    queue_order,
)

GiB = 1 << 30


def cpu(memory: int = 16 * GiB, **labels: str) -> PeerSpecs:
    return PeerSpecs(cpu_cores=8, memory_bytes=memory, torch_version="2.5.0", os="Linux", labels=labels)


def gpu(gpu_memory: int = 80 * GiB, memory: int = 64 * GiB, **labels: str) -> PeerSpecs:
    card = GpuSpec(name="NVIDIA H100", memory_bytes=gpu_memory, compute_capability="9.0")
    return PeerSpecs(
        cpu_cores=16,
        memory_bytes=memory,
        gpus=[card],
        torch_version="2.5.0",
        cuda_version="12.4",
        os="Linux",
        labels=labels,
        device_index=0,
    )


def req(
    sid: str,
    order: int,
    *,
    peers: int = 1,
    params: int = 10_000,
    at: float = 0.0,
    requirements: Requirements | None = None,
    **policy: object,
) -> Request:
    return Request(
        session_id=sid,
        num_peers=peers,
        param_count=params,
        requested_at=at,
        order=order,
        requirements=requirements or Requirements(),
        policy=msgspec.convert(policy, QueuePolicy),
    )


def placed(decisions: list[object]) -> dict[str, tuple[str, ...]]:
    return {d.session_id: d.peer_ids for d in decisions if isinstance(d, Placement)}


# ------------------------------------------------------------------ requirements


@pytest.mark.parametrize(
    ("specs", "requirements", "ok"),
    [
        (cpu(), Requirements(), True),
        (gpu(), Requirements(), True),
        (cpu(), Requirements(device="cuda"), False),
        (gpu(), Requirements(device="cuda"), True),
        (gpu(), Requirements(device="cpu"), False),
        (cpu(), Requirements(device="cpu"), True),
        (gpu(gpu_memory=16 * GiB), Requirements(min_gpu_memory_bytes=24 * GiB), False),
        (gpu(gpu_memory=80 * GiB), Requirements(min_gpu_memory_bytes=24 * GiB), True),
        (cpu(memory=512 * GiB), Requirements(min_gpu_memory_bytes=1), False),
        (cpu(memory=8 * GiB), Requirements(min_memory_bytes=16 * GiB), False),
        (cpu(memory=32 * GiB), Requirements(min_memory_bytes=16 * GiB), True),
        (cpu(region="eu", tier="gold"), Requirements(labels={"region": "eu"}), True),
        (cpu(region="us"), Requirements(labels={"region": "eu"}), False),
        (cpu(), Requirements(labels={"region": "eu"}), False),
        (None, Requirements(), True),
        (None, Requirements(device="cpu"), False),
    ],
)
def test_requirements_are_matched(specs: PeerSpecs | None, requirements: Requirements, ok: bool) -> None:
    assert matches(specs, requirements) is ok


def test_a_gpu_peer_is_judged_by_the_gpu_it_trains_on() -> None:
    small = GpuSpec(name="T4", memory_bytes=16 * GiB, compute_capability="7.5")
    big = GpuSpec(name="H100", memory_bytes=80 * GiB, compute_capability="9.0")
    specs = PeerSpecs(
        cpu_cores=8, memory_bytes=GiB, gpus=[small, big], torch_version="2.5.0", os="Linux", device_index=0
    )
    assert not matches(specs, Requirements(min_gpu_memory_bytes=24 * GiB))
    assert matches(msgspec.structs.replace(specs, device_index=1), Requirements(min_gpu_memory_bytes=24 * GiB))


def test_the_contract_refuses_values_out_of_bounds() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"device": "tpu"}', type=Requirements)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"min_memory_bytes": -1}', type=Requirements)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"labels": {"bad key!": "x"}}', type=Requirements)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"priority": 1000}', type=QueuePolicy)
    with pytest.raises(msgspec.ValidationError, match="names no GPU"):
        msgspec.json.decode(
            b'{"cpu_cores": 1, "memory_bytes": 1, "torch_version": "2.5", "os": "Linux", "device_index": 0}',
            type=PeerSpecs,
        )
    round_trip = msgspec.json.decode(msgspec.json.encode(gpu(region="eu")), type=PeerSpecs)
    assert round_trip == gpu(region="eu")


# ------------------------------------------------------------------ capacity


def test_memory_need_is_params_times_bytes_times_factor_plus_data_and_overhead() -> None:
    model = MemoryModel(bytes_per_param=4, factor=4.0, overhead_bytes=100)
    assert memory_needed(1_000, data_bytes=7, model=model) == 16_000 + 7 + 100


def test_never_over_capacity() -> None:
    huge = 2_000_000_000  # 2e9 parameters: about 30 GiB to train
    need = memory_needed(huge)
    assert not can_hold(gpu(gpu_memory=24 * GiB), need)
    assert can_hold(gpu(gpu_memory=80 * GiB), need)
    peers = [
        PeerView("a-small-gpu", gpu(gpu_memory=24 * GiB)),
        PeerView("b-cpu", cpu(memory=16 * GiB)),
        PeerView("c-big-gpu", gpu(gpu_memory=80 * GiB)),
        PeerView("d-big-gpu-busy", gpu(gpu_memory=80 * GiB), idle=False),
    ]
    decisions = plan([req("s", 1, params=huge, peers=1)], peers, now=0)
    assert placed(decisions) == {"s": ("c-big-gpu",)}
    decisions = plan([req("s", 1, params=huge, peers=2)], peers, now=0)
    assert isinstance(decisions[0], Refused)
    assert "too small" in decisions[0].reason


def test_an_idle_peer_goes_to_one_session_only() -> None:
    peers = [PeerView(f"p{i}", cpu()) for i in range(5)]
    requests = [req(f"s{i}", i, peers=2, queue=True) for i in range(3)]
    decisions = plan(requests, peers, now=0)
    chosen = [p for ids in placed(decisions).values() for p in ids]
    assert len(chosen) == len(set(chosen)) == 4
    assert [d for d in decisions if isinstance(d, Queued)] == [
        Queued("s2", 1, "needs 2 idle peer(s) matching (device=any): 1 idle, 5 online able to hold it; "
               "the idle ones are held for it")
    ]  # fmt: skip


# ------------------------------------------------------------------ preference


def test_large_models_prefer_gpu_peers_and_small_ones_cpu_peers() -> None:
    peers = [PeerView("cpu-1", cpu()), PeerView("cpu-2", cpu()), PeerView("gpu-1", gpu()), PeerView("gpu-2", gpu())]
    small, large = req("small", 1, params=50_000, peers=2), req("large", 2, params=5_000_000, peers=2)
    assert placed(plan([small, large], peers, now=0)) == {"small": ("cpu-1", "cpu-2"), "large": ("gpu-1", "gpu-2")}
    # either way round in the queue
    assert placed(plan([large, small], peers, now=0)) == {"small": ("cpu-1", "cpu-2"), "large": ("gpu-1", "gpu-2")}
    # the threshold is a rule, not a constant
    assert placed(plan([small], peers, now=0, rules=Rules(large_model_params=10_000))) == {"small": ("gpu-1", "gpu-2")}


def test_the_other_kind_fills_in_when_the_preferred_one_is_short() -> None:
    peers = [PeerView("cpu-1", cpu()), PeerView("gpu-1", gpu())]
    decision = plan([req("large", 1, params=5_000_000, peers=2)], peers, now=0)[0]
    assert isinstance(decision, Placement)
    assert decision.peer_ids == ("gpu-1", "cpu-1")
    assert "1 GPU and 1 CPU" in decision.reason and "GPU peers first" in decision.reason


def test_the_tightest_gpu_that_holds_the_model_is_taken() -> None:
    peers = [PeerView("h100", gpu(gpu_memory=80 * GiB)), PeerView("t4", gpu(gpu_memory=16 * GiB))]
    assert placed(plan([req("s", 1, params=5_000_000)], peers, now=0)) == {"s": ("t4",)}


def test_placement_reason_names_requirements_and_need() -> None:
    requirements = Requirements(device="cuda", min_gpu_memory_bytes=24 * GiB, labels={"region": "eu"})
    peers = [PeerView("g", gpu(region="eu"))]
    decision = plan([req("s", 1, requirements=requirements)], peers, now=0)[0]
    assert isinstance(decision, Placement)
    assert "device=cuda, GPU memory >= 24.0 GiB, region=eu" in decision.reason
    assert "each needs about" in decision.reason


# ------------------------------------------------------------------ the queue


def test_fifo_per_priority() -> None:
    requests = [
        req("low-1", 1, priority=-1),
        req("mid-1", 2),
        req("high-1", 3, priority=5),
        req("mid-2", 4),
        req("high-2", 5, priority=5),
    ]
    assert [r.session_id for r in queue_order(requests)] == ["high-1", "high-2", "mid-1", "mid-2", "low-1"]
    assert positions(requests) == {"high-1": 1, "high-2": 2, "mid-1": 3, "mid-2": 4, "low-1": 5}


def test_peers_go_to_the_queue_in_order_and_the_rest_wait_with_positions() -> None:
    peers = [PeerView(f"p{i}", cpu()) for i in range(3)]
    requests = [req("first", 1, queue=True), req("second", 2, queue=True), req("urgent", 3, priority=1, queue=True)]
    requests += [req("third", 4, queue=True), req("fourth", 5, queue=True)]
    decisions = plan(requests, peers, now=0)
    assert set(placed(decisions)) == {"urgent", "first", "second"}
    assert [(d.session_id, d.position) for d in decisions if isinstance(d, Queued)] == [("third", 1), ("fourth", 2)]


def test_a_blocked_head_keeps_its_peers_but_not_peers_it_cannot_use() -> None:
    peers = [PeerView("c1", cpu()), PeerView("c2", cpu()), PeerView("g1", gpu()), PeerView("g2", gpu(), idle=False)]
    head = req("head", 1, peers=2, requirements=Requirements(device="cuda"), queue=True)
    later_gpu = req("later-gpu", 2, peers=1, requirements=Requirements(device="cuda"), queue=True)
    later_cpu = req("later-cpu", 3, peers=2, requirements=Requirements(device="cpu"), queue=True)
    decisions = plan([head, later_gpu, later_cpu], peers, now=0)
    # g1 is held for the head (g2 will free up); the CPU session does not wait behind a GPU one
    assert placed(decisions) == {"later-cpu": ("c1", "c2")}
    assert [(d.session_id, d.position) for d in decisions if isinstance(d, Queued)] == [
        ("head", 1),
        ("later-gpu", 2),
    ]


def test_a_request_that_even_the_whole_swarm_cannot_serve_holds_up_nobody() -> None:
    peers = [PeerView("c1", cpu())]
    head = req("cuda-on-cpu-swarm", 1, requirements=Requirements(device="cuda"), queue_timeout_s=30)
    later = req("later", 2, queue=True)
    decisions = plan([head, later], peers, now=10)
    assert placed(decisions) == {"later": ("c1",)}
    assert decisions[-1] == Queued(
        "cuda-on-cpu-swarm", 1, "needs 1 idle peer(s) matching (device=cuda): 0 idle, 0 online able to hold it"
    )


def test_without_queue_a_session_that_cannot_start_is_refused() -> None:
    decisions = plan([req("s", 1, peers=2)], [PeerView("c1", cpu())], now=0)
    assert decisions == [Refused("s", "needs 2 idle peer(s) matching (device=any): 1 idle, 1 online able to hold it")]


def test_a_queued_session_expires_after_its_timeout() -> None:
    waiting = req("s", 1, at=100.0, requirements=Requirements(device="cuda"), queue_timeout_s=30)
    cpu_swarm = [PeerView("c1", cpu())]
    assert isinstance(plan([waiting], cpu_swarm, now=129.9)[0], Queued)
    assert expired([waiting], now=129.9) == []
    decision = plan([waiting], cpu_swarm, now=130.0)[0]
    assert decision == Expired("s", "no 1 matching idle peers within 30 s")
    assert expired([waiting], now=131) == [decision]


def test_expiry_is_checked_before_placement() -> None:
    waiting = req("s", 1, at=0.0, queue_timeout_s=5)
    assert isinstance(plan([waiting], [PeerView("c1", cpu())], now=5.0)[0], Expired)


def test_cancel_while_queued_removes_it_and_the_others_move_up() -> None:
    requests = [req("a", 1, queue=True), req("b", 2, queue=True), req("c", 3, queue=True)]
    left = cancel(requests, "a")
    assert [r.session_id for r in left] == ["b", "c"]
    assert positions(left) == {"b": 1, "c": 2}
    assert cancel(left, "not-there") == left
    # the cancelled one's peer goes to the next in line
    assert placed(plan(left, [PeerView("c1", cpu())], now=0)) == {"b": ("c1",)}


def test_plan_is_deterministic_whatever_order_the_peers_come_in() -> None:
    peers = [PeerView(f"p{i:02d}", cpu(memory=(8 + i % 3) * GiB)) for i in range(12)]
    requests = [req(f"s{i}", i, peers=3, queue=True) for i in range(5)]
    assert plan(requests, peers, now=0) == plan(list(reversed(requests)), list(reversed(peers)), now=0)
