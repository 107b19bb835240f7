"""Beyond one NATS server: three real nats-server processes on loopback, streams kept on all three
(SWARMTRAIN_STREAM_REPLICAS=3); the EVENTS stream's leader is SIGKILLed in the middle of a session,
and the session completes with nothing lost or doubled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import nats
import nats.errors
import pytest

from swarmtrain.common import bus

from .checker import Checker, rebuild_diff
from .conftest import make_stack
from .harness import Api, FaultStack, timed, wait_for

HP = {"epochs": 12, "batch_size": 16, "lr": 0.01}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    yield from make_stack(tmp_path_factory, "cluster", peers=2, nodes=3)


async def _streams(url: str) -> dict[str, tuple[int, str | None]]:
    """Each stream's replicas and its leader's name."""
    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream()
        out = {}
        for name in (bus.EVENTS_STREAM, bus.COMMANDS_STREAM):
            info = await js.stream_info(name)
            out[name] = (int(info.config.num_replicas or 1), info.cluster.leader if info.cluster else None)
        return out
    finally:
        await nc.drain()


def _leader(url: str) -> str | None:
    """The EVENTS stream's leader, or None while there is none (an election, a node gone)."""
    try:
        return asyncio.run(asyncio.wait_for(_streams(url), 5))[bus.EVENTS_STREAM][1]
    except (TimeoutError, nats.errors.Error):
        return None


def test_the_stream_leader_killed_mid_session(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    streams = asyncio.run(_streams(stack.nats_url))
    assert {name: r for name, (r, _) in streams.items()} == {"EVENTS": 3, "COMMANDS": 3}
    leader = streams[bus.EVENTS_STREAM][1]
    assert leader in stack.procs, streams
    checker = Checker(stack, api)
    api.idle(["peer-1", "peer-2"])
    sid = api.sweep(dataset, [HP, {**HP, "lr": 0.02}])
    api.started(sid)
    with timed() as took:
        stack.procs[leader].kill()  # not restarted: two nodes of three carry on
        killed = time.monotonic()
        new_leader = wait_for(
            lambda: (s := _leader(stack.nats_url)) not in (None, leader) and s,
            60,
            "a new stream leader",
        )
        recovery = round(time.monotonic() - killed, 1)
        done = api.ended(sid)
    assert done["status"] == "completed", done
    assert sorted(p["status"] for p in done["peers"]) == ["done", "done"], done
    report = checker.check([sid])
    record.update(
        fault=f"3-node NATS cluster: the EVENTS leader ({leader}) SIGKILLed, not restarted",
        recovery_s=recovery,
        session_end_after_fault_s=took["s"],
        status=done["status"],
        new_leader=new_leader,
        heartbeats=report.heartbeats,
        lost=len(report.lost),
        duplicated=len(report.duplicated),
        unexpected=len(report.unexpected),
    )
    assert report.counts == (0, 0, 0), str(report)
    assert rebuild_diff(stack) == []
