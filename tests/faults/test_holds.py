"""Faults the platform rides out: a service SIGKILLed mid-session (restarted, or not), two schedulers
at once, nats-server and PostgreSQL killed and restarted from their store, the scheduler stopped for
20 s, a duplicate and a malformed message injected. Every session completes; the checker counts
nothing lost, doubled or unexpected; a rebuild of the projections equals the live ones.

A service that is not restarted: the projector and the gateway are nobody's dependency, so the
session ends in the log as if nothing happened (the read models wait for a projector, the REST API
for a gateway); a lone scheduler is everybody's, so no session moves until one runs again, and a
second scheduler is what keeps sessions going through the loss of one (both tested here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import nats

from swarmtrain.common import bus
from swarmtrain.common.events import (
    TERMINAL_SESSION_EVENTS,
    Heartbeat,
    PeerLocked,
    PeerReleased,
    SessionStarted,
    new_id,
)

from .checker import Checker, read_stream, rebuild_diff
from .harness import SESSION_BOUND_S, Api, FaultStack, Proc, timed, wait_for

HP = {"epochs": 12, "batch_size": 16, "lr": 0.01}


def session_through(
    stack: FaultStack,
    api: Api,
    dataset: str,
    record: dict[str, Any],
    fault: str,
    strike: Callable[[Checker, str], float],
) -> dict[str, Any]:
    """A two-peer sweep; ``strike`` hurts the stack once both peers have trained an epoch and returns
    how long the platform took to recover. Asserts the end state, the three zeros and the rebuild."""
    checker = Checker(stack, api)
    api.idle(["peer-1", "peer-2"])
    sid = api.sweep(dataset, [HP, HP])
    api.started(sid)
    with timed() as took:
        recovery = strike(checker, sid)
        done = api.ended(sid)
    assert done["status"] == "completed", done
    assert sorted((p["status"], p["epoch"]) for p in done["peers"]) == [("done", HP["epochs"])] * 2, done
    report = checker.check([sid])
    record.update(
        fault=fault,
        recovery_s=recovery,
        session_end_after_fault_s=took["s"],
        status=done["status"],
        heartbeats=report.heartbeats,
        lost=len(report.lost),
        duplicated=len(report.duplicated),
        unexpected=len(report.unexpected),
    )
    assert report.counts == (0, 0, 0), str(report)
    assert rebuild_diff(stack) == []
    return done


def _back(stack: FaultStack, started: float) -> float:
    wait_for(stack.ready, 60, "/readyz 200 again")
    return round(time.monotonic() - started, 1)


def test_projector_sigkilled_mid_session(stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]) -> None:
    def strike(checker: Checker, sid: str) -> float:
        start = time.monotonic()
        stack.procs["projector"].kill()
        stack.procs["projector"].start()
        wait_for(stack.caught_up, 60, "the projector to catch up")
        return round(time.monotonic() - start, 1)

    session_through(stack, api, dataset, record, "projector SIGKILL, restarted", strike)


def test_scheduler_sigkilled_mid_session(stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]) -> None:
    def strike(checker: Checker, sid: str) -> float:
        start = time.monotonic()
        stack.procs["scheduler"].kill()
        stack.procs["scheduler"].start()
        api.ended(sid)  # the restarted scheduler rebuilds its state from the log and completes it
        return round(time.monotonic() - start, 1)

    session_through(stack, api, dataset, record, "scheduler SIGKILL, restarted", strike)


def _ended_in_log(stack: FaultStack, checker: Checker, sid: str) -> str:
    """Wait until the session's terminal event is stored (read from NATS: no projector or gateway
    needed); its type."""

    def ended() -> str | None:
        stored = asyncio.run(read_stream(stack.nats_url, checker.baseline))
        return next(
            (
                type(s.event).__name__
                for s in stored
                if isinstance(s.event, TERMINAL_SESSION_EVENTS) and s.event.session_id == sid
            ),
            None,
        )

    return wait_for(ended, SESSION_BOUND_S, f"session {sid}'s end in the log", interval=0.5)


def test_projector_sigkilled_not_restarted(stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]) -> None:
    def strike(checker: Checker, sid: str) -> float:
        stack.procs["projector"].kill()
        killed = time.monotonic()
        record["ended_in_log"] = _ended_in_log(stack, checker, sid)
        record["log_end_after_fault_s"] = round(time.monotonic() - killed, 1)
        assert api.session(sid)["status"] == "running"  # the read models wait, the session did not
        stack.procs["projector"].start()  # only to read the end state: from where its last commit left it
        restarted = time.monotonic()
        wait_for(stack.caught_up, 60, "a new projector to catch up")
        return round(time.monotonic() - restarted, 1)

    session_through(stack, api, dataset, record, "projector SIGKILL, not restarted (started later)", strike)
    assert record["ended_in_log"] == "SessionCompleted"


def test_gateway_sigkilled_not_restarted(stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]) -> None:
    """With a ``file://`` store the gateway is on the peers' path: it serves the signed URLs they
    fetch datasets from and upload models to. A run that must upload while no gateway runs fails
    once its transfer retries are spent, so the session ends ``failed``, never stuck. (With S3 the
    presigned URLs go to the object store, and the gateway is nobody's dependency.)"""
    checker = Checker(stack, api)
    api.idle(["peer-1", "peer-2"])
    sid = api.sweep(dataset, [HP, HP])
    api.started(sid)
    stack.procs["gateway"].kill()
    killed = time.monotonic()
    ended = _ended_in_log(stack, checker, sid)
    record.update(
        fault="gateway SIGKILL, not restarted (file:// store: peers upload through it)",
        ended_in_log=ended,
        session_end_after_fault_s=round(time.monotonic() - killed, 1),
    )
    stack.procs["gateway"].start()  # only to read the end state
    record["recovery_s"] = _back(stack, killed)
    done = api.session(sid)
    record["status"] = done["status"]
    assert done["status"] == "failed" and ended == "SessionFailed", done
    assert all(p["status"] == "failed" and "Connect" in (p["reason"] or "") for p in done["peers"]), done
    report = checker.check([sid])
    record.update(lost=len(report.lost), duplicated=len(report.duplicated), unexpected=len(report.unexpected))
    assert report.counts == (0, 0, 0), str(report)
    assert rebuild_diff(stack) == []


def _second_scheduler(stack: FaultStack) -> Proc:
    if not (proc := stack.procs.get("scheduler-2")) or not proc.alive():
        proc = stack.procs["scheduler-2"] = stack.service("scheduler-2", stack.cli("scheduler")).start()
    return proc


def _decisions(stored: list[Any], sid: str) -> dict[str, int]:
    """How many starts, locks and releases of session ``sid`` the log holds."""
    counts = {"SessionStarted": 0, "PeerLocked": 0, "PeerReleased": 0}
    for s in stored:
        match s.event:
            case SessionStarted(session_id=x) | PeerLocked(session_id=x) | PeerReleased(session_id=x) if x == sid:
                counts[type(s.event).__name__] += 1
    return counts


def test_two_schedulers_at_once(stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]) -> None:
    """Both decide on the same log: compare-and-set locks and starts, ids derived from their cause
    (JetStream drops the second copy), so every decision is stored once."""
    _second_scheduler(stack)
    seen: dict[str, Any] = {}

    def strike(checker: Checker, sid: str) -> float:
        seen["checker"] = checker
        return 0.0  # no fault but the other scheduler

    done = session_through(stack, api, dataset, record, "two schedulers at once", strike)
    stored = asyncio.run(read_stream(stack.nats_url, seen["checker"].baseline))
    assert _decisions(stored, done["session_id"]) == {"SessionStarted": 1, "PeerLocked": 2, "PeerReleased": 2}
    assert stack.procs["scheduler"].alive() and stack.procs["scheduler-2"].alive()


def test_one_of_two_schedulers_sigkilled_not_restarted(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    second = _second_scheduler(stack)

    def strike(checker: Checker, sid: str) -> float:
        start = time.monotonic()
        stack.procs["scheduler"].kill()  # not restarted: the other one carries on alone
        api.ended(sid)
        return round(time.monotonic() - start, 1)

    try:
        session_through(stack, api, dataset, record, "one of two schedulers SIGKILLed, not restarted", strike)
    finally:  # the stack goes on with one scheduler, under its usual name
        stack.procs["scheduler"].stop()
        stack.procs["scheduler"] = stack.procs.pop("scheduler-2")
    assert second.alive()


def test_gateway_sigkilled_mid_session(stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]) -> None:
    def strike(checker: Checker, sid: str) -> float:
        start = time.monotonic()
        stack.procs["gateway"].kill()
        stack.procs["gateway"].start()
        return _back(stack, start)

    session_through(stack, api, dataset, record, "gateway SIGKILL, restarted", strike)


def test_nats_server_killed_and_restarted_from_its_store(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    def strike(checker: Checker, sid: str) -> float:
        start = time.monotonic()
        stack.procs["nats"].kill()
        stack.procs["nats"].start()  # same port, same store folder, fsync before every ack
        return _back(stack, start)

    session_through(stack, api, dataset, record, "nats-server SIGKILL, restarted from its store", strike)


def test_postgres_killed_for_five_seconds(stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]) -> None:
    def strike(checker: Checker, sid: str) -> float:
        stack.procs["postgres"].kill()
        down = time.monotonic()
        wait_for(lambda: stack.ready() is None and time.monotonic() - down >= 5, 30, "5 s of PostgreSQL down")
        stack.procs["postgres"].start()  # crash recovery from its data folder
        return _back(stack, down)

    session_through(stack, api, dataset, record, "PostgreSQL SIGKILL, down 5 s, restarted", strike)


def test_scheduler_sigstopped_for_twenty_seconds(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    def strike(checker: Checker, sid: str) -> float:
        scheduler = stack.procs["scheduler"]
        scheduler.pause()
        paused = time.monotonic()
        # the peers train on and finish while the scheduler sleeps; it must not then fail them
        wait_for(lambda: time.monotonic() - paused >= 20, 30, "20 s of a stopped scheduler", interval=1)
        scheduler.resume()
        resumed = time.monotonic()
        api.ended(sid)
        return round(time.monotonic() - resumed, 1)

    session_through(stack, api, dataset, record, "scheduler SIGSTOP 20 s, SIGCONT", strike)


async def _inject(stack: FaultStack, checker: Checker, sid: str) -> tuple[bool, int]:
    """Publish a stored heartbeat again with its own Nats-Msg-Id, and a malformed message; returns
    (the copy was answered as a duplicate, the malformed message's stream sequence)."""
    stored = await read_stream(stack.nats_url, checker.baseline)
    beat = next(s for s in stored if isinstance(s.event, Heartbeat) and s.event.session_id == sid)
    assert beat.msg_id is not None
    nc = await nats.connect(stack.nats_url.split(","))
    try:
        js = nc.jetstream()
        again = await js.publish(beat.subject, beat.data, headers={"Nats-Msg-Id": beat.msg_id})
        malformed_id = new_id()
        checker.injected.add(malformed_id)
        bad = await js.publish(
            f"session.{sid}.events",
            b'{"type": "Heartbeat", "session_id": "' + sid.encode() + b'", "epoch": "one"',
            headers={"Nats-Msg-Id": malformed_id},
            stream=bus.EVENTS_STREAM,
        )
    finally:
        await nc.drain()
    return bool(again.duplicate), int(bad.seq)


def test_duplicate_and_malformed_messages_injected(
    stack: FaultStack, api: Api, dataset: str, record: dict[str, Any]
) -> None:
    seen: dict[str, Any] = {}

    def strike(checker: Checker, sid: str) -> float:
        start = time.monotonic()
        seen["duplicate"], seen["malformed_seq"] = asyncio.run(_inject(stack, checker, sid))
        wait_for(stack.caught_up, 60, "the projector past the malformed message")
        return round(time.monotonic() - start, 1)

    session_through(stack, api, dataset, record, "duplicate publish + malformed message injected", strike)
    assert seen["duplicate"] is True  # JetStream answered the copy with the original, stored once
    assert all(p.alive() for p in stack.procs.values())  # nothing crashed on the malformed one
