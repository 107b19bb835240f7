"""Round overhead of fedavg on real processes: where a round's time goes beyond its slowest peer's training.

Real nats-server, PostgreSQL, projector, scheduler and gateway, and ``PEERS`` real ``swarmtrain peer``
processes (1 torch thread each, CPU), as ``bench._common.Stack`` starts them. One fedavg session on
digits (examples/digits.csv), MLP ``--hidden`` (default [512, 512]: 1.3 MB updates), ``--rounds``
rounds of ``--local-epochs`` local epochs; then the session's stored events are read back from the
EVENTS stream (each with the stream's append timestamp) and each peer's JSON log lines (structlog's
UTC timestamp), all on this machine's one clock.

Per round ``r`` (round 1 is left out: its start includes the job's setup), per peer ``p``:

- ``start(p, r)``: ``p`` logged ``round averaged`` for ``r - 1`` (it starts round ``r`` right after);
- ``train(p, r)``: to its last ``Heartbeat`` of the round (``occurred_at``: set on the peer's loop
  when the epoch ended; local epochs plus the per-epoch validation pass); ``epoch_s``: the epochs
  alone (``num_samples / samples_per_s``);
- ``encode+upload``: last heartbeat -> ``ModelUpdatePublished.occurred_at`` (serialize, PUT);
- ``report -> appended``: that report's ``occurred_at`` -> its append to the log (the scheduler's
  report check);
- ``close decision``: the last update appended -> ``RoundClosed`` appended;
- ``closed -> averaged``: ``RoundClosed`` appended -> ``p`` logs ``round averaged`` (the fact forwarded
  as a command, fetch, verify, aggregate, load, validation pass, PUT of the average, its report);
- wall: ``max_p averaged(p, r) - max_p averaged(p, r - 1)``; utilisation: the slowest ``train`` / wall.

    .venv/bin/python bench/round_overhead.py                 # 2 peers, MLP [512, 512], 8 rounds
    .venv/bin/python bench/round_overhead.py --hidden 2048 2048 --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats

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


def averaged_logs(path: Path, session_id: str) -> tuple[str, dict[int, float]]:
    """The peer's id and, per round, when it logged ``round averaged``."""
    out: dict[int, float] = {}
    peer_id = ""
    for line in path.read_text(errors="replace").splitlines():
        if '"peer started"' in line:
            peer_id = json.loads(line[line.find("{") :]).get("peer_id", peer_id)
        if '"round averaged"' not in line:
            continue
        with_json = line[line.find("{") :]
        try:
            rec = json.loads(with_json)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "round averaged" and rec.get("session_id", session_id) == session_id:
            out[int(rec["round"])] = ts(rec["timestamp"])
    return peer_id, out


def analyse(events: list[tuple[float, Any]], logs: dict[str, dict[int, float]], epochs: int) -> dict[str, Any]:
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
    rounds = sorted(r for r in closed if r > 1 and all(r in logs[p] and r - 1 in logs[p] for p in peers))
    rows = []
    for r in rounds:
        per: dict[str, dict[str, float]] = {}
        for p in peers:
            hb = beats[p, r]
            pub_appended, pub = published[p, r]
            train_end = max(ts(b.occurred_at) for b in hb)
            per[p] = {
                "train": train_end - logs[p][r - 1],
                "epoch_s": sum(pub.num_samples / b.samples_per_s for b in hb),
                "encode_upload": ts(pub.occurred_at) - train_end,
                "report_appended": pub_appended - ts(pub.occurred_at),
                "closed_averaged": logs[p][r] - closed[r],
                "nbytes": float(pub.nbytes),
            }
        wall = max(logs[p][r] for p in peers) - max(logs[p][r - 1] for p in peers)
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
            "closed_averaged": max(v["closed_averaged"] for v in per.values()),
            "averaged_appended": averaged_appended.get(r, float("nan")) - closed[r],
            "update_bytes": statistics.fmean(v["nbytes"] for v in per.values()),
            "per_peer": per,
        }
        rows.append(row)
    return {"rounds": rows}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with Stack("overhead") as st:
        st.start("projector")
        st.start("scheduler")
        st.start("gateway")
        for i in range(PEERS):
            st.start("peer", "--name", f"bench-{i}", "--device", "cpu", name=f"peer-{i}")
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
                "model": {"kind": "mlp", "hidden": args.hidden},
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
        logs = dict(averaged_logs(st.logs / f"peer-{i}.log", sid) for i in range(PEERS))
        out = analyse(events, logs, args.local_epochs)
        out["session_s"] = elapsed
        out["val_accuracy"] = session.get("val_accuracy") or session.get("best_val_accuracy")
        return out


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    rows = out["rounds"]
    ms = 1000.0
    keys = [
        ("wall", "round wall"),
        ("train_slowest", "slowest peer's training (epochs + per-epoch validation)"),
        ("epoch_s_slowest", "  of which its epochs alone"),
        ("overhead", "overhead (wall - slowest training)"),
        ("encode_upload", "  last heartbeat -> update published (serialize + PUT), slowest peer"),
        ("report_appended", "  update report -> appended to the log (scheduler's report check)"),
        ("close_decision", "  last update appended -> RoundClosed appended (close decision)"),
        (
            "closed_averaged",
            "  RoundClosed appended -> peer logs 'round averaged' "
            "(forward, fetch, verify, average, load, validate, PUT)",
        ),
        ("averaged_appended", "  (RoundClosed -> RoundAveraged appended)"),
    ]
    print(
        f"## round overhead: {PEERS} peers, MLP {args.hidden}, digits, {args.rounds} rounds x {args.local_epochs} "
        f"local epochs, batch {args.batch_size}; update {rows[0]['update_bytes'] / 1e6:.2f} MB; rounds 2..{args.rounds}"
    )
    print("\n| step | median (ms) | min | max |\n|---|---|---|---|")
    for key, name in keys:
        vals = [r[key] * ms for r in rows]
        print(f"| {name} | {median(vals):.0f} | {min(vals):.0f} | {max(vals):.0f} |")
    util = [r["utilisation"] for r in rows]
    print(f"| compute utilisation (slowest training / wall) | {median(util):.2f} | {min(util):.2f} | {max(util):.2f} |")
    print(
        "\nper round (ms): round, wall, slowest training, overhead, encode+upload, report->appended, "
        "close, closed->averaged"
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
                        "closed_averaged",
                    )
                ]
            )
        )
    print(f"\nsession {out['session_s']:.1f} s end to end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = asyncio.run(run(args))
    report(out, args)
    if args.json:
        args.json.write_text(json.dumps(out | {"args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
