"""Faults that are the platform's, never a peer's (issue 24): the scheduler SIGSTOPped past a round's
deadline, a peer SIGKILLed at the moment its ``Train`` is sent and restarted, PostgreSQL killed under
the projector again and again, the gateway killed twice in a row during a fedavg round. No peer run
fails for them: the sessions complete, every run ``done``, no ``PeerFailed`` in the log; the
checker's three zeros and an equal rebuild, as everywhere in the suite.

The fedavg sessions fail on any peer's failure (``on_peer_failure: fail``), so a platform fault
counted against a peer shows as a failed session. Their rounds' deadlines are at least 20 s
(``SWARMTRAIN_ROUND_MIN_S``; 10 s by default): a restarted peer, cold, must make its first round
within one, and on this project's 2-core machine at load 12-15 that took a fresh process over 10 s
(5 and 10 s were too short). The peer
timeout is 15 s, long enough for a peer restarted at once to be back within it on a loaded machine
(a peer's start, torch imported, took 9-14 s at load 5-15).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import nats
import nats.errors
import pytest

from swarmtrain.common import subjects
from swarmtrain.common.events import PeerFailed, Train, decode_command

from .checker import Checker, read_stream, rebuild_diff
from .conftest import make_stack
from .harness import Api, FaultStack, timed, wait_for

PEER_TIMEOUT_S = 15.0
ROUND_MIN_S = 20.0
PAUSE_S = 22.0
"""Longer than a round's deadline and the scheduler's gap (T/2)."""
LOCAL = {"epochs": 1, "batch_size": 16, "lr": 0.01}
PEERS = ["peer-1", "peer-2"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    yield from make_stack(
        tmp_path_factory,
        "ridesout",
        peers=2,
        peer_timeout_s=PEER_TIMEOUT_S,
        # the default transfer retry: two restarts in a row took up to 14 s here
        settings={"SWARMTRAIN_ROUND_MIN_S": str(ROUND_MIN_S), "SWARMTRAIN_TRANSFER_RETRY_S": "30"},
    )


def _failures(stack: FaultStack, checker: Checker, sid: str) -> list[str]:
    """The ``PeerFailed`` facts of session ``sid`` in the log: who failed, and why."""
    stored = asyncio.run(read_stream(stack.nats_url, checker.baseline))
    return [
        f"{s.event.peer_id}: {s.event.reason}"
        for s in stored
        if isinstance(s.event, PeerFailed) and s.event.session_id == sid
    ]


def _trains(stack: FaultStack, peer: str, sid: str) -> list[int]:
    """The start round of every ``Train`` sent to ``peer`` in session ``sid`` (the COMMANDS stream)."""

    async def read() -> list[int]:
        nc = await nats.connect(stack.nats_url.split(","))
        try:
            js = nc.jetstream()
            sub = await js.subscribe(subjects.peer_command(peer), ordered_consumer=True)
            rounds: list[int] = []
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                while True:
                    msg = await sub.next_msg(timeout=2)
                    command = decode_command(msg.data)
                    if isinstance(command, Train) and command.session_id == sid:
                        rounds.append(command.start_round)
            await sub.unsubscribe()
            return rounds
        finally:
            await nc.drain()

    return asyncio.run(read())


def _nobody_failed(
    stack: FaultStack, api: Api, checker: Checker, sid: str, record: dict[str, Any], done: dict[str, Any]
) -> None:
    """The session completed with every run done and no peer failed; the three zeros; the rebuild."""
    failures = _failures(stack, checker, sid)
    record.update(status=done["status"], peer_failures=len(failures))
    assert failures == [], failures
    assert done["status"] == "completed", done
    assert [p["status"] for p in done["peers"]] == ["done"] * len(done["peers"]), done
    report = checker.check([sid])
    record.update(
        heartbeats=report.heartbeats,
        lost=len(report.lost),
        duplicated=len(report.duplicated),
        unexpected=len(report.unexpected),
    )
    assert report.counts == (0, 0, 0), str(report)
    assert rebuild_diff(stack) == []


def test_scheduler_sigstopped_past_a_round_deadline_fails_no_peer(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    """The scheduler stopped for 22 s in the middle of a fedavg (past its 20 s round
    deadline): the peers published meanwhile, and on SIGCONT the scheduler reads their updates
    before it judges anyone; with ``on_peer_failure: fail`` a single unfair failure fails the session."""
    record["fault"] = f"scheduler SIGSTOP {PAUSE_S:.0f} s during a fedavg (round deadline 20 s, on_peer_failure fail)"
    checker = Checker(stack, api)
    api.idle(PEERS)
    sid = api.fedavg(dataset, 2, rounds=8, hp=LOCAL, on_peer_failure="fail")
    scheduler = stack.procs["scheduler"]
    with timed() as took:
        api.started(sid, 2)  # a round or more closed
        scheduler.pause()
        paused = time.monotonic()
        wait_for(lambda: time.monotonic() - paused >= PAUSE_S, 40, "the scheduler stopped", interval=0.5)
        scheduler.resume()
        done = api.ended(sid)
    record["session_end_after_fault_s"] = took["s"]
    _nobody_failed(stack, api, checker, sid, record, done)


def test_peer_sigkilled_as_its_train_is_sent_then_restarted(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    """The peer dies just as the session starts on it: the ``Train`` goes to the dead process's
    pending fetch (or waits in the stream), and comes to the restarted process within half the
    presence timeout; the round waits for a peer that took up its work late."""
    record["fault"] = "peer SIGKILL as its Train is sent, restarted at once (fedavg, on_peer_failure fail)"
    checker = Checker(stack, api)
    api.idle(PEERS)
    victim = stack.procs["peer-2"]
    sid = api.fedavg(dataset, 2, rounds=4, hp=LOCAL, on_peer_failure="fail")
    victim.kill()  # the scheduler starts the session within a tick: on a peer that just died
    struck = time.monotonic()
    victim.start()
    done = api.ended(sid)
    record["session_end_after_fault_s"] = round(time.monotonic() - struck, 1)
    if any("went offline" in f for f in _failures(stack, checker, sid)):
        record["skipped"] = f"restart slower than the {PEER_TIMEOUT_S:.0f} s timeout (load {os.getloadavg()[0]:.0f})"
        pytest.skip("the peer took longer than the timeout to restart on this machine: not the case under test")
    _nobody_failed(stack, api, checker, sid, record, done)


def test_peer_sigkilled_after_a_round_resumes_at_the_open_round(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    """A peer killed once round 1 has closed, restarted at once: its beats name no ``Train``, so
    after the re-send wait the scheduler sends it again, starting at the session's open round (with
    every fact it was sent before, under new ids), not at round 1. The peer rebuilds the last
    average from those facts as a newcomer does and makes the open round within its deadline;
    with ``on_peer_failure: fail`` a missed round would fail the session."""
    record["fault"] = "peer SIGKILL after round 1 of a fedavg, restarted at once (on_peer_failure fail)"
    checker = Checker(stack, api)
    ids = api.idle(PEERS)
    victim = stack.procs["peer-2"]
    sid = api.fedavg(dataset, 2, rounds=4, hp=LOCAL, on_peer_failure="fail")
    api.started(sid, 2, timeout=120)  # both peers in round 2: round 1 closed
    victim.kill()
    struck = time.monotonic()
    victim.start()
    done = api.ended(sid)
    record["session_end_after_fault_s"] = round(time.monotonic() - struck, 1)
    if any("went offline" in f for f in _failures(stack, checker, sid)):
        record["skipped"] = f"restart slower than the {PEER_TIMEOUT_S:.0f} s timeout (load {os.getloadavg()[0]:.0f})"
        pytest.skip("the peer took longer than the timeout to restart on this machine: not the case under test")
    _nobody_failed(stack, api, checker, sid, record, done)
    resumed = [r for r in _trains(stack, ids["peer-2"], sid) if r > 1]
    record["resumed_at_round"] = resumed
    assert resumed, "the re-sent Train started at round 1"
    assert "caught up from a round's average" in stack.tail("peer-2", 200_000), stack.tail("peer-2")


def test_postgres_killed_under_the_projector_in_a_loop(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    """PostgreSQL SIGKILLed four times while the projector writes a session's beats, each time
    restarted at once: the projector rides out whatever its client raises (never exits)."""
    kills = 4
    record["fault"] = f"PostgreSQL SIGKILL x{kills} under the projector, restarted at once each time"
    checker = Checker(stack, api)
    api.idle(PEERS)
    hp = {"epochs": 16, "batch_size": 16, "lr": 0.01}
    sid = api.sweep(dataset, [hp, {**hp, "lr": 0.02}])
    api.started(sid)
    postgres, projector = stack.procs["postgres"], stack.procs["projector"]
    with timed() as took:
        for _ in range(kills):
            postgres.kill()
            postgres.start()  # crash recovery from its data folder
            wait_for(stack.ready, 60, "/readyz 200 again")
            assert projector.alive(), stack.tail("projector")
        wait_for(stack.caught_up, 60, "the projector to catch up")
    record["recovery_s"] = took["s"]
    assert projector.alive(), stack.tail("projector")
    done = api.ended(sid)
    _nobody_failed(stack, api, checker, sid, record, done)


def test_gateway_killed_twice_in_a_row_during_a_round(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    """With a ``file://`` store the peers' updates and averages travel through the gateway's signed
    URLs: killed twice in a row mid-round, restarted each time, it costs the transfers a few tries
    (backoff, for up to ``SWARMTRAIN_TRANSFER_RETRY_S``) and no peer its run."""
    record["fault"] = "gateway SIGKILL twice in a row during a fedavg round, restarted each time"
    checker = Checker(stack, api)
    api.idle(PEERS)
    sid = api.fedavg(dataset, 2, rounds=6, hp=LOCAL, on_peer_failure="fail")
    api.started(sid, 2)
    gateway = stack.procs["gateway"]
    with timed() as took:
        for _ in range(2):
            gateway.kill()
            gateway.start()
            wait_for(stack.ready, 60, "/readyz 200 again")
    record["recovery_s"] = took["s"]
    done = api.ended(sid)
    _nobody_failed(stack, api, checker, sid, record, done)
