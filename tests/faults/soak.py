"""``make soak``: an operator's bad week in minutes. The fault suite's stack (real processes, four
peers, peer timeout 5 s) runs two sessions at all times, a two-peer sweep and a three-peer fedavg in
turn, while a seeded random fault strikes every 8-20 s: SIGKILL of a peer, the scheduler, the
projector, the gateway, nats-server or PostgreSQL (each restarted at once, as ``swarmtrain up``'s
supervisor does), or SIGSTOP of a peer or the scheduler for 5-15 s; every third time two at once.

At the end (faults stopped, the sessions in flight given two minutes to end) it reports the sessions
completed, failed and stuck, the peer runs failed by reason, and which of those failures the
platform caused: a run failed while its own peer was not hurt in the 90 s before (a killed or
stopped peer's run may fail: that is the peer's fault, not the platform's). Then the checker's
counts over every session and whether a rebuild of the projections equals the live tables.

    python -m tests.faults.soak --minutes 10 --seed 1 [--json out.json]

Exit status 1 when a session is stuck, a run failed for the platform's faults, the checker counts
anything, or the rebuild differs; what it measured is printed as a Markdown table either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from swarmtrain.common.events import PeerFailed
from swarmtrain.common.status import SESSION_TERMINAL

from .checker import Checker, read_stream, rebuild_diff
from .harness import Api, FaultStack, wait_for

T = TypeVar("T")
PEER_TIMEOUT_S = 5.0
PEERS = 4
BLAME_WINDOW_S = 90.0
"""A run that fails this soon after its own peer was killed or stopped failed for its peer's fault."""
END_GRACE_S = 120.0
SWEEP_HP = {"epochs": 8, "batch_size": 16, "lr": 0.01}
FEDAVG_HP = {"epochs": 1, "batch_size": 16, "lr": 0.01}
FEDAVG_ROUNDS = 5
KILLABLE = ("peer", "scheduler", "projector", "gateway", "nats", "postgres")
STOPPABLE = ("peer", "scheduler")


@dataclass
class Soak:
    stack: FaultStack
    rng: random.Random
    api: Api | None = None
    sessions: dict[str, str] = field(default_factory=dict)
    """session id -> strategy, every session the soak requested."""
    in_flight: set[str] = field(default_factory=set)
    ended: dict[str, str] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    hurt: list[tuple[float, str]] = field(default_factory=list)
    """(UTC time, peer name) of every fault that struck a peer."""
    resumes: list[tuple[float, str]] = field(default_factory=list)
    """(monotonic time, process name) of the SIGCONTs due."""
    turn: int = 0
    strikes: int = 0

    # ------------------------------------------------------------------ the REST API, through faults

    def retrying(self, what: str, call: Callable[[], T], timeout: float = 90.0) -> T:
        """``call()``, again while the gateway is restarting (connection refused, a 503, a 5xx)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return call()
            except (httpx.HTTPError, AssertionError) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{what}: still failing after {timeout}s: {exc}") from exc
                self.resume_due()  # a process stopped for a while is resumed on time while we wait
                time.sleep(0.5)

    def request(self, dataset: str) -> None:
        assert self.api is not None
        api = self.api
        if self.turn % 2 == 0:
            sid = self.retrying("a sweep", lambda: api.sweep(dataset, [SWEEP_HP, {**SWEEP_HP, "lr": 0.02}]))
            self.sessions[sid] = "sweep"
        else:
            sid = self.retrying("a fedavg", lambda: api.fedavg(dataset, 3, rounds=FEDAVG_ROUNDS, hp=FEDAVG_HP))
            self.sessions[sid] = "fedavg"
        self.turn += 1
        self.in_flight.add(sid)

    def look(self) -> None:
        """Note the sessions in flight that ended (a gateway down now is asked again next time)."""
        assert self.api is not None
        for sid in sorted(self.in_flight):
            try:
                status = self.api.session(sid)["status"]
            except (httpx.HTTPError, AssertionError):
                return
            if status in SESSION_TERMINAL:
                self.in_flight.discard(sid)
                self.ended[sid] = status

    # ------------------------------------------------------------------ faults

    def strike(self) -> list[str]:
        kinds = self.rng.sample(KILLABLE + tuple(f"stop {s}" for s in STOPPABLE), 2 if self.double() else 1)
        done = []
        used: set[str] = set()
        for kind in kinds:
            stop = kind.startswith("stop ")
            target = kind.removeprefix("stop ")
            if target == "peer":
                target = self.rng.choice([f"peer-{i}" for i in range(1, PEERS + 1) if f"peer-{i}" not in used])
            if target in used:
                continue
            used.add(target)
            proc = self.stack.procs[target]
            if stop:
                if proc.paused:
                    continue
                seconds = self.rng.uniform(5, 15)
                proc.pause()
                self.resumes.append((time.monotonic() + seconds, target))
                label = f"SIGSTOP {kind.removeprefix('stop ')} {seconds:.0f}s"
            else:
                self.resumes = [(t, n) for t, n in self.resumes if n != target]
                proc.kill()
                proc.start()  # supervised: restarted at once
                label = f"SIGKILL {kind}"
            if target.startswith("peer-"):
                self.hurt.append((time.time(), target))
            self.faults[" ".join(label.split(" ")[:2])] += 1
            done.append(f"{label} ({target})")
        return done

    def double(self) -> bool:
        """Every third strike is two faults at once."""
        self.strikes += 1
        return self.strikes % 3 == 0

    def resume_due(self) -> None:
        now = time.monotonic()
        for _, name in [r for r in self.resumes if r[0] <= now]:
            proc = self.stack.procs[name]
            if proc.paused:
                proc.resume()
            if name.startswith("peer-"):
                self.hurt.append((time.time(), name))
        self.resumes = [r for r in self.resumes if r[0] > now]

    def resume_all(self) -> None:
        for _, name in self.resumes:
            if self.stack.procs[name].paused:
                self.stack.procs[name].resume()
        self.resumes = []

    # ------------------------------------------------------------------ the run

    def run(self, minutes: float) -> dict[str, Any]:
        api = self.api = self.retrying("sign up", lambda: Api(self.stack.url))
        dataset = self.retrying("an upload", api.upload)
        self.retrying("the peers", lambda: api.idle([f"peer-{i}" for i in range(1, PEERS + 1)]))
        checker = Checker(self.stack, api)
        load_start = os.getloadavg()
        started = time.monotonic()
        next_fault = started + self.rng.uniform(8, 20)
        while time.monotonic() - started < minutes * 60:
            self.resume_due()
            self.look()
            while len(self.in_flight) < 2:
                self.request(dataset)
            if time.monotonic() >= next_fault:
                for line in self.strike():
                    print(f"[{time.monotonic() - started:6.0f}s] {line}", flush=True)
                next_fault = time.monotonic() + self.rng.uniform(8, 20)
            time.sleep(0.5)
        self.resume_all()
        soaked = time.monotonic() - started
        wait_for(self.stack.ready, 90, "/readyz 200 after the last fault")
        end = time.monotonic() + END_GRACE_S
        while self.in_flight and time.monotonic() < end:
            self.look()
            time.sleep(1)
        load_end = os.getloadavg()
        return self.report(checker, soaked, load_start, load_end)

    def report(
        self, checker: Checker, soaked: float, load_start: tuple[float, ...], load_end: tuple[float, ...]
    ) -> dict[str, Any]:
        assert self.api is not None
        names = {p["peer_id"]: p["name"] for p in self.retrying("the peers", self.api.peers)}
        stored = asyncio.run(read_stream(self.stack.nats_url, checker.baseline))
        reasons: Counter[str] = Counter()
        platform: list[str] = []
        for s in stored:
            if not isinstance(s.event, PeerFailed) or s.event.session_id not in self.sessions:
                continue
            reason = re.sub(r"[0-9]+(\.[0-9]+)?", "N", s.event.reason)[:80]
            reasons[reason] += 1
            at, name = s.event.occurred_at.timestamp(), names.get(s.event.peer_id, s.event.peer_id)
            if not any(who == name and at - BLAME_WINDOW_S <= t <= at + 1 for t, who in self.hurt):
                platform.append(f"{name} in {self.sessions[s.event.session_id]} {s.event.session_id}: {reason}")
        checked = checker.check(list(self.sessions))
        diff = rebuild_diff(self.stack)
        by_status = Counter((self.sessions[sid], status) for sid, status in self.ended.items())
        ready = self.stack.ready() or {}
        return {
            "minutes": round(soaked / 60, 1),
            "load_start": [round(x, 1) for x in load_start],
            "load_end": [round(x, 1) for x in load_end],
            "faults": sum(self.faults.values()),
            "faults_by_kind": dict(sorted(self.faults.items())),
            "sessions": len(self.sessions),
            "sessions_by_outcome": {f"{k[0]} {k[1]}": n for k, n in sorted(by_status.items())},
            "stuck": sorted(self.in_flight),
            "peer_runs_failed": dict(reasons.most_common()),
            "failed_for_the_platform": platform,
            "heartbeats_checked": checked.heartbeats,
            "lost": len(checked.lost),
            "duplicated": len(checked.duplicated),
            "unexpected": len(checked.unexpected),
            "checker_detail": str(checked) if checked.counts != (0, 0, 0) else "",
            "rebuild_equal": diff == [],
            "rebuild_diff": diff,
            "readyz": {k: ready.get(k) for k in ("status", "dead_letters") if k in ready},
        }


def table(result: dict[str, Any]) -> str:
    rows = [
        (
            "minutes of faults (load at start / end)",
            f"{result['minutes']} ({result['load_start']} / {result['load_end']})",
        ),
        (
            "faults (by kind)",
            f"{result['faults']} ({', '.join(f'{k} {v}' for k, v in result['faults_by_kind'].items())})",
        ),
        ("sessions requested", result["sessions"]),
        ("sessions by outcome", ", ".join(f"{k}: {v}" for k, v in result["sessions_by_outcome"].items()) or "-"),
        ("sessions stuck", len(result["stuck"])),
        (
            "peer runs failed, by reason",
            "; ".join(f"{k}: {v}" for k, v in result["peer_runs_failed"].items()) or "none",
        ),
        ("of those, for the platform's own faults", len(result["failed_for_the_platform"])),
        ("heartbeats checked", result["heartbeats_checked"]),
        ("lost / duplicated / unexpected", f"{result['lost']} / {result['duplicated']} / {result['unexpected']}"),
        ("rebuild equal to the live tables", "yes" if result["rebuild_equal"] else f"no: {result['rebuild_diff']}"),
    ]
    lines = ["| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def ok(result: dict[str, Any]) -> bool:
    return (
        not result["stuck"]
        and not result["failed_for_the_platform"]
        and (result["lost"], result["duplicated"], result["unexpected"]) == (0, 0, 0)
        and result["rebuild_equal"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "10")))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "1")))
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    root = Path(tempfile.mkdtemp(prefix="swarmtrain-soak-"))
    stack = FaultStack(root, peers=PEERS, peer_timeout_s=PEER_TIMEOUT_S)
    print(f"soak: seed {args.seed}, {args.minutes} min, stack under {root}", flush=True)
    try:
        stack.start()
        result = Soak(stack, random.Random(args.seed)).run(args.minutes)
    except BaseException:
        print(stack.logs()[-20000:])
        raise
    finally:
        stack.close()
    result["seed"] = args.seed
    print(table(result))
    for line in result["failed_for_the_platform"]:
        print(f"failed for the platform: {line}")
    if result["checker_detail"]:
        print(result["checker_detail"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
