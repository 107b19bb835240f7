"""Round overhead of fedavg on real processes: where a round's time goes beyond its slowest peer's training.

Real nats-server, PostgreSQL, projector, scheduler and gateway, and ``PEERS`` real ``swarmtrain peer``
processes (1 torch thread each), as ``bench._common.Stack`` starts them. One fedavg session on
digits (examples/digits.csv) per configuration, ``--rounds`` rounds of ``--local-epochs`` local
epochs; then the session's stored events are read back from the EVENTS stream (each with the
stream's append timestamp) and each peer's JSON log lines (structlog's UTC timestamp; the peer's
own timings of each step in ``round averaged``'s ``ms``), all on this machine's one clock.

Configurations (``--config``; default ``cpu``, and ``gpu`` too where CUDA is found):

- ``cpu``: MLP [512, 512] (1.2 MB updates), both peers on the CPU;
- ``gpu``: MLP [2048, 2048] (18 MB updates), both peers sharing ``cuda:0``.

``--hidden`` / ``--device`` override the configuration's model and device.

Per round ``r`` (round 1 is left out: its start includes the job's setup), per peer ``p``:

- ``start(p, r)``: ``p`` logged ``round averaged`` for ``r - 1`` (it starts round ``r`` right after);
- ``train(p, r)``: to its last ``Heartbeat`` of the round (``occurred_at``: set on the peer's loop
  when the epoch ended; local epochs plus the per-epoch validation pass); ``epoch_s``: the epochs
  alone (``num_samples / samples_per_s``);
- ``encode+upload``: last heartbeat -> ``ModelUpdatePublished.occurred_at`` (serialize, PUT, the
  report's send; each also timed by the peer: ``serialize``, ``upload``, ``report``);
- ``report -> appended``: that report's ``occurred_at`` -> its append to the log (the scheduler's
  report check);
- ``close decision``: the last update appended -> ``RoundClosed`` appended;
- ``forward``: ``RoundClosed`` appended -> the fact reached ``p``'s round protocol (``closed_seen``);
- the peer's own timings after that: ``fetch`` and ``verify`` (each update's, summed; the updates
  are fetched and checked side by side; ``apply`` is the wall time of all three),
  ``average``, ``load``, ``validate``;
- ``closed -> averaged``: ``RoundClosed`` appended -> ``p`` logs ``round averaged`` (all of the above;
  the average's PUT and its report run after, beside the next round: ``stored``);
- wall: ``max_p averaged(p, r) - max_p averaged(p, r - 1)``; utilisation: the slowest ``train`` / wall.

    .venv/bin/python -m bench.round_overhead                      # cpu (and gpu where CUDA is found)
    .venv/bin/python -m bench.round_overhead --config gpu --rounds 6
    .venv/bin/python -m bench.round_overhead --hidden 2048 2048 --device cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import torch

from bench._common import ROOT, Stack, median, signup, upload_dataset, wait_idle_peers
from swarmtrain.common import bus, subjects
from swarmtrain.common.events import (
    Heartbeat,
    ModelUpdatePublished,
    RoundAveraged,
    RoundClosed,
    decode_event,
)
from swarmtrain.common.status import SESSION_TERMINAL

PEERS = 2


def ts(value: str | datetime) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def stored_events(nats_url: str, session_id: str) -> list[tuple[float, Any]]:
    """The session's events in log order, each with the time the stream appended it."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    out: list[tuple[float, Any]] = []
    sub = await js.subscribe(subjects.session_events(session_id), ordered_consumer=True, stream=bus.EVENTS_STREAM)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            out.append((msg.metadata.timestamp.timestamp(), decode_event(msg.data)))
    finally:
        await sub.unsubscribe()
        await nc.drain()
    return out


class PeerLog:
    """One peer's ``round averaged`` lines: when, per round, and its own timings of the round's steps."""

    def __init__(self) -> None:
        self.peer_id = ""
        self.averaged: dict[int, float] = {}
        """round -> when the peer logged ``round averaged`` (it starts the next round right after)."""
        self.closed_seen: dict[int, float] = {}
        """round -> when the forwarded ``RoundClosed`` reached the round's protocol."""
        self.ms: dict[int, dict[str, float]] = {}
        """round -> milliseconds per step (serialize, upload, report, fetch, verify, average, load, validate)."""
        self.stored_ms: dict[int, float] = {}
        """round -> milliseconds to store the average and report it (while the next round trains)."""


def peer_log(path: Path, session_id: str) -> PeerLog:
    out = PeerLog()
    for line in path.read_text(errors="replace").splitlines():
        if not any(key in line for key in ('"peer started"', '"round averaged"', '"round average stored"')):
            continue
        try:
            rec = json.loads(line[line.find("{") :])
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "peer started":
            out.peer_id = rec.get("peer_id", out.peer_id)
        if rec.get("session_id", session_id) != session_id:
            continue
        if rec.get("event") == "round averaged":
            r = int(rec["round"])
            out.averaged[r] = ts(rec["timestamp"])
            out.closed_seen[r] = float(rec.get("closed_seen", "nan"))
            out.ms[r] = {k: float(v) for k, v in (rec.get("ms") or {}).items()}
        elif rec.get("event") == "round average stored":
            out.stored_ms[int(rec["round"])] = float(rec["ms"])
    return out


PEER_STEPS = ("serialize", "upload", "report", "apply", "fetch", "verify", "average", "load", "validate")


def analyse(events: list[tuple[float, Any]], logs: dict[str, PeerLog], epochs: int) -> dict[str, Any]:
    beats: dict[tuple[str, int], list[Heartbeat]] = {}
    published: dict[tuple[str, int], tuple[float, ModelUpdatePublished]] = {}
    closed: dict[int, float] = {}
    averaged_appended: dict[int, float] = {}
    for appended, ev in events:
        if isinstance(ev, Heartbeat):
            beats.setdefault((ev.peer_id, (ev.epoch - 1) // epochs + 1), []).append(ev)
        elif isinstance(ev, ModelUpdatePublished):
            published[ev.peer_id, ev.round] = (appended, ev)
        elif isinstance(ev, RoundClosed):
            closed[ev.round] = appended
        elif isinstance(ev, RoundAveraged):
            averaged_appended[ev.round] = appended
    peers = sorted(logs)
    rounds = sorted(
        r for r in closed if r > 1 and all(r in logs[p].averaged and r - 1 in logs[p].averaged for p in peers)
    )
    rows = []
    for r in rounds:
        per: dict[str, dict[str, float]] = {}
        for p in peers:
            hb = beats[p, r]
            pub_appended, pub = published[p, r]
            train_end = max(ts(b.occurred_at) for b in hb)
            steps = logs[p].ms.get(r, {})
            per[p] = {
                "train": train_end - logs[p].averaged[r - 1],
                "epoch_s": sum(pub.num_samples / b.samples_per_s for b in hb),
                "encode_upload": ts(pub.occurred_at) - train_end,
                "report_appended": pub_appended - ts(pub.occurred_at),
                "forward": logs[p].closed_seen[r] - closed[r],
                "closed_averaged": logs[p].averaged[r] - closed[r],
                "stored": logs[p].stored_ms.get(r, float("nan")) / 1000,
                "nbytes": float(pub.nbytes),
            } | {step: steps.get(step, 0.0) / 1000 for step in PEER_STEPS}
        wall = max(logs[p].averaged[r] for p in peers) - max(logs[p].averaged[r - 1] for p in peers)
        slowest = max(peers, key=lambda p: per[p]["train"])
        last_appended = max(published[p, r][0] for p in peers)
        row = {
            "round": r,
            "wall": wall,
            "train_slowest": per[slowest]["train"],
            "epoch_s_slowest": per[slowest]["epoch_s"],
            "overhead": wall - per[slowest]["train"],
            "utilisation": per[slowest]["train"] / wall,
            "encode_upload": max(v["encode_upload"] for v in per.values()),
            "report_appended": max(v["report_appended"] for v in per.values()),
            "close_decision": closed[r] - last_appended,
            "forward": max(v["forward"] for v in per.values()),
            "closed_averaged": max(v["closed_averaged"] for v in per.values()),
            "averaged_appended": averaged_appended.get(r, float("nan")) - closed[r],
            "stored": max(v["stored"] for v in per.values()),
            "update_bytes": statistics.fmean(v["nbytes"] for v in per.values()),
            "per_peer": per,
        } | {step: max(v[step] for v in per.values()) for step in PEER_STEPS}
        rows.append(row)
    return {"rounds": rows}


@dataclass(frozen=True)
class Config:
    hidden: list[int]
    device: str


CONFIGS = {"cpu": Config([512, 512], "cpu"), "gpu": Config([2048, 2048], "cuda")}


async def run(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    with Stack("overhead") as st:
        st.start("projector")
        st.start("scheduler")
        st.start("gateway")
        for i in range(PEERS):
            st.start("peer", "--name", f"bench-{i}", "--device", config.device, name=f"peer-{i}")
        st.wait_gateway()
        st.wait_log("scheduler", "state rebuilt")
        async with httpx.AsyncClient(base_url=st.gateway_url, timeout=30) as client:
            await signup(client)
            dataset_id = await upload_dataset(client, ROOT / "examples" / "digits.csv")
            await wait_idle_peers(st.database_url, PEERS, timeout=120)
            body = {
                "dataset_id": dataset_id,
                "strategy": "fedavg",
                "num_peers": PEERS,
                "rounds": args.rounds,
                "model": {"kind": "mlp", "hidden": config.hidden},
                "validation_split": 0.2,
                "seed": 0,
                "hyperparameters": {"epochs": args.local_epochs, "batch_size": args.batch_size, "lr": 0.003},
            }
            t0 = time.perf_counter()
            resp = await client.post("/sessions", json=body)
            if resp.status_code != 201:
                raise RuntimeError(f"POST /sessions: {resp.status_code} {resp.text[:300]}")
            sid = resp.json()["session_id"]
            deadline = time.monotonic() + 300
            while True:
                session = (await client.get(f"/sessions/{sid}")).json()
                if session.get("status") in SESSION_TERMINAL:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"session not ended in 300 s: {session.get('status')}")
                await asyncio.sleep(0.2)
            elapsed = time.perf_counter() - t0
        if session["status"] != "completed":
            raise RuntimeError(f"session {session['status']}:\n{st.tail('scheduler')}\n{st.tail('peer-0')}")
        events = await stored_events(st.nats_url, sid)
        found = [peer_log(st.logs / f"peer-{i}.log", sid) for i in range(PEERS)]
        logs = {log.peer_id: log for log in found}
        out = analyse(events, logs, args.local_epochs)
        out["session_s"] = elapsed
        out["val_accuracy"] = session.get("val_accuracy") or session.get("best_val_accuracy")
        return out


def report(out: dict[str, Any], args: argparse.Namespace, name: str, config: Config) -> None:
    rows = out["rounds"]
    ms = 1000.0
    keys = [
        ("wall", "round wall"),
        ("train_slowest", "slowest peer's training (epochs + per-epoch validation)"),
        ("epoch_s_slowest", "  of which its epochs alone"),
        ("overhead", "overhead (wall - slowest training)"),
        ("encode_upload", "  last heartbeat -> update reported (serialize + upload + report)"),
        ("serialize", "    serialize the update"),
        ("upload", "    upload (PUT through the signed URL)"),
        ("report", "    report sent and acknowledged"),
        ("report_appended", "  update report -> appended to the log (scheduler's report check)"),
        ("close_decision", "  last update appended -> RoundClosed appended (close decision)"),
        ("forward", "  RoundClosed appended -> the peer has it (forwarded as a command)"),
        ("apply", "  fetch + verify + average (wall; the updates side by side)"),
        ("fetch", "    fetch (own update from memory; summed over updates)"),
        ("verify", "    verify: sha256, parse, check, decode (summed over updates)"),
        ("average", "  average (aggregator + outer step)"),
        ("load", "  load the average into the model"),
        ("validate", "  validation pass of the average"),
        ("closed_averaged", "  RoundClosed appended -> next round starts (forward .. validate)"),
        ("stored", "  (store the average + report it: overlaps the next round)"),
        ("averaged_appended", "  (RoundClosed -> RoundAveraged appended)"),
    ]
    print(
        f"## round overhead ({name}): {PEERS} peers on {config.device}, MLP {config.hidden}, digits, "
        f"{args.rounds} rounds x {args.local_epochs} local epochs, batch {args.batch_size}; "
        f"update {rows[0]['update_bytes'] / 1e6:.2f} MB; rounds 2..{args.rounds}"
    )
    print("\n| step | median (ms) | min | max |\n|---|---|---|---|")
    for key, label in keys:
        vals = [r[key] * ms for r in rows]
        print(f"| {label} | {median(vals):.0f} | {min(vals):.0f} | {max(vals):.0f} |")
    util = [r["utilisation"] for r in rows]
    print(f"| compute utilisation (slowest training / wall) | {median(util):.2f} | {min(util):.2f} | {max(util):.2f} |")
    print(
        "\nper round (ms): round, wall, slowest training, overhead, encode+upload, report->appended, "
        "close, forward, fetch, closed->next round"
    )
    for r in rows:
        print(
            "  "
            + ", ".join(
                [str(r["round"])]
                + [
                    f"{r[k] * ms:.0f}"
                    for k in (
                        "wall",
                        "train_slowest",
                        "overhead",
                        "encode_upload",
                        "report_appended",
                        "close_decision",
                        "forward",
                        "fetch",
                        "closed_averaged",
                    )
                ]
            )
        )
    print(f"\nsession {out['session_s']:.1f} s end to end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), nargs="+", help="default: cpu, and gpu where CUDA is found")
    ap.add_argument("--hidden", type=int, nargs="+", help="the MLP's hidden layers (default: the configuration's)")
    ap.add_argument("--device", help="the peers' --device (default: the configuration's)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.config or (["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"])
    results: dict[str, Any] = {}
    for name in names:
        base = CONFIGS[name]
        config = Config(args.hidden or base.hidden, args.device or base.device)
        out = asyncio.run(run(args, config))
        report(out, args, name, config)
        results[name] = out | {"hidden": config.hidden, "device": config.device}
    if args.json:
        args.json.write_text(json.dumps(results | {"args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
