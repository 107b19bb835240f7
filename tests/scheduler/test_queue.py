"""Placement and the queue wired into ``decide``: specs folded from ``PeerRegistered``, requirements,
GPU-first for large models, priorities, the queue timeout, cancel while queued, the reason in the
session's facts. Plain function calls: no broker, no clock but the one passed in."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from swarmtrain.common.events import (
    DatasetUploaded,
    Event,
    PeerLocked,
    PeerRegistered,
    PeerWentOnline,
    SessionCancelled,
    SessionFailed,
    SessionRequested,
)
from swarmtrain.common.models import MlpSpec
from swarmtrain.common.specs import GpuSpec, PeerSpecs, Requirements
from swarmtrain.scheduler.actions import Action, Append, Clocks, Config, Start, Timing
from swarmtrain.scheduler.decide import decide, request_of
from swarmtrain.scheduler.state import State
from tests.factories import session_requested
from tests.scheduler.helpers import replay

GiB = 1 << 30
REQUESTED_AT = 1_000.0
CONFIG = Config(uri=lambda key: f"file:///blobs/{key}", timing=Timing(peer_timeout=5.0))


def cpu_specs(memory: int = 16 * GiB, **labels: str) -> PeerSpecs:
    return PeerSpecs(cpu_cores=4, memory_bytes=memory, torch_version="2.5.0", os="Linux", labels=labels)


def gpu_specs(gpu_memory: int = 80 * GiB) -> PeerSpecs:
    card = GpuSpec(name="NVIDIA H100", memory_bytes=gpu_memory, compute_capability="9.0")
    return PeerSpecs(
        cpu_cores=16,
        memory_bytes=64 * GiB,
        gpus=[card],
        torch_version="2.5.0",
        cuda_version="12.4",
        os="Linux",
        device_index=0,
    )


def peer(peer_id: str, specs: PeerSpecs | None) -> list[Event]:
    device = "cpu" if specs is None or specs.device_index is None else "cuda:0 (NVIDIA H100)"
    return [PeerRegistered(peer_id=peer_id, name=peer_id, device=device, specs=specs), PeerWentOnline(peer_id=peer_id)]


def dataset(features: int = 4, rows: int = 100) -> DatasetUploaded:
    return DatasetUploaded(
        dataset_id="d",
        owner_id="u",
        name="d.csv",
        uri="file:///d.csv",
        sha256="0",
        size_bytes=1,
        rows=rows,
        features=features,
        classes=2,
        label_column="label",
    )


def requested(sid: str, n: int = 1, *, at: float = REQUESTED_AT, **fields: Any) -> SessionRequested:
    return session_requested(sid, n, occurred_at=datetime.fromtimestamp(at, UTC), **fields)


def decided(state: State, wall: float = REQUESTED_AT + 1) -> list[Action]:
    # monotonic 0: every peer counts as just seen (within its grace period from the start)
    return decide(state, Clocks(now=0.0, wall=wall), CONFIG)


def starts(actions: list[Action]) -> dict[str, tuple[str, ...]]:
    return {a.session_id: a.peer_ids for a in actions if isinstance(a, Start)}


def failed(actions: list[Action]) -> dict[str, str]:
    return {
        a.event.session_id: a.event.reason
        for a in actions
        if isinstance(a, Append) and isinstance(a.event, SessionFailed)
    }


LARGE = MlpSpec(hidden=[1024, 1024])  # about 1.05 million parameters on 4 features: GPU first
SMALL = MlpSpec(hidden=[8])


def test_specs_travel_from_registration_into_the_state() -> None:
    state = replay(*peer("g", gpu_specs()))
    assert state.peers["g"].specs == gpu_specs()


def test_a_large_model_goes_to_the_gpu_peer_and_a_small_one_to_the_cpu_peer() -> None:
    state = replay(
        dataset(),
        *peer("c", cpu_specs()),
        *peer("g", gpu_specs()),
        requested("small", model=SMALL),
        requested("large", model=LARGE),
    )
    assert starts(decided(state)) == {"small": ("c",), "large": ("g",)}


def test_the_placement_reason_is_in_session_started() -> None:
    state = replay(dataset(), *peer("c", cpu_specs()), *peer("g", gpu_specs()), requested("s", model=LARGE))
    (start,) = [a for a in decided(state) if isinstance(a, Start)]
    assert start.peer_ids == ("g",)
    assert "GPU peers first" in start.started.placement
    assert "1 GPU and 0 CPU peer(s)" in start.started.placement


def test_requirements_are_matched_and_a_peer_that_cannot_hold_the_model_is_never_used() -> None:
    tiny = cpu_specs(memory=520 << 20)  # less than the 512 MiB overhead plus a 1M-parameter model
    state = replay(
        dataset(),
        *peer("tiny", tiny),
        *peer("eu", cpu_specs(region="eu")),
        requested("labelled", requirements=Requirements(labels={"region": "eu"}), model=SMALL),
        requested("big", model=LARGE, queue=True),
    )
    # "labelled" takes the only eu peer; "big" cannot fit on "tiny" and waits
    assert starts(decided(state)) == {"labelled": ("eu",)}


def test_a_cuda_session_stays_queued_on_a_cpu_swarm_and_fails_after_its_timeout() -> None:
    state = replay(
        *peer("c", cpu_specs()), requested("s", requirements=Requirements(device="cuda"), queue_timeout_s=30)
    )
    assert decided(state, REQUESTED_AT + 29) == []
    reason = failed(decided(state, REQUESTED_AT + 30))["s"]
    assert reason.startswith("queue timeout: no 1 matching idle peers within 30 s")


def test_higher_priority_first_then_first_come_first_served() -> None:
    state = replay(
        *peer("c", cpu_specs()),
        requested("first", queue=True),
        requested("second", queue=True),
        requested("urgent", queue=True, priority=5),
    )
    assert starts(decided(state)) == {"urgent": ("c",)}
    orders = sorted(("first", "second"), key=lambda sid: request_of(state.sessions[sid]).order)
    assert orders == ["first", "second"]


def test_a_blocked_head_keeps_the_idle_peers_from_later_sessions() -> None:
    state = replay(
        *peer("a", cpu_specs()),
        *peer("b", cpu_specs()),
        PeerLocked(peer_id="b", session_id="other"),
        requested("two", 2, queue=True),
        requested("one", 1, queue=True),
    )
    assert starts(decided(state)) == {}  # "a" is held for "two", which came first


def test_a_cancelled_queued_session_leaves_the_queue_and_the_next_one_starts() -> None:
    state = replay(
        *peer("a", cpu_specs()),
        *peer("b", cpu_specs()),
        PeerLocked(peer_id="b", session_id="other"),
        requested("two", 2, queue=True),
        requested("one", 1, queue=True),
        SessionCancelled(session_id="two"),
    )
    assert starts(decided(state)) == {"one": ("a",)}


def test_peers_older_than_specs_still_take_sessions_that_ask_nothing() -> None:
    state = replay(*peer("old", None), requested("plain"), requested("cuda", requirements=Requirements(device="cuda")))
    assert starts(decided(state)) == {"plain": ("old",)}


def test_the_train_carries_the_session_precision() -> None:
    state = replay(*peer("g", gpu_specs()), requested("s", precision="bf16"))
    (start,) = [a for a in decided(state) if isinstance(a, Start)]
    assert [t.precision for t in start.trains] == ["bf16"]
