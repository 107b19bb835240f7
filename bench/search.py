"""A search's worth, on real peers: random search without pruning against ``asha`` and ``tpe`` +
``asha``, the same space and budget, several seeds: the best validation accuracy reached (the
scheduler's own measurement of the finished models, ``SearchConcluded.best_value``) and the
device-seconds spent, side by side in one run.

    python -m bench.search            # 4 peers, 24 trials, 3 seeds
    python -m bench.search --quick    # 2 peers, 4 trials, 1 seed: does it run?

What runs: a real stack (nats-server, PostgreSQL, projector, scheduler, gateway) and ``peers`` peer
processes on the CPU (one torch thread each), as ``swarmtrain up`` starts them. Each search is a
``POST /sessions`` with a ``search``, on the digits dataset, to its end, after one warm-up search
that is not measured (each peer reads the dataset and warms torch up); the three configurations
run interleaved per seed, in a rotated order (each goes first once), so load drift hits them alike.
Device-seconds are what the peers spent on the trials, as the log shows it (this process reads
``session.<id>.events`` on NATS): for each trial, from its ``TrialStarted`` to its end
(``PeerDone``, ``TrialPruned`` or ``PeerFailed``), so a pruned trial stops paying at its rung, and
a trial's fixed costs (its ``Train`` delivered, the dataset read, the model uploaded) are paid as a
user pays them.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import httpx
import nats
from nats.aio.msg import Msg

from bench._common import Report, Stack, quick, show, signup, upload_dataset, wait_idle_peers
from swarmtrain.common.events import (
    Event,
    PeerDone,
    PeerFailed,
    SearchConcluded,
    SessionCompleted,
    SessionFailed,
    TrialPruned,
    TrialStarted,
    decode_event,
)

SPACE = {
    "lr": {"log_uniform": [1e-4, 1e-1]},
    "batch_size": {"choice": [32, 64, 128]},
    "epochs": {"int": [4, 32]},
    "model.hidden.0": {"choice": [32, 64, 128]},
}
QUICK_SPACE = SPACE | {"epochs": {"int": [2, 4]}}
PRUNER = {"name": "asha", "min_epochs": 2, "reduction_factor": 3}
CONFIGS = {
    "random, no pruning": {"sampler": "random", "pruner": {"name": "none"}},
    "random + asha": {"sampler": "random", "pruner": PRUNER},
    "tpe + asha": {"sampler": "tpe", "pruner": PRUNER},
}
BASE = "random, no pruning"
SEARCH_TIMEOUT_S = 900
"""A hang guard for one search on a busy 2-core machine, not a timing."""


class Log:
    """The sessions' events as this process saw them on NATS, each with its arrival time."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[float, Event]]] = defaultdict(list)
        self.ended: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def on_event(self, msg: Msg) -> None:
        now = time.perf_counter()
        event = decode_event(msg.data)
        sid = getattr(event, "session_id", None)
        if sid is None:
            return
        self.events[sid].append((now, event))
        if isinstance(event, SessionCompleted | SessionFailed):
            self.ended[sid].set()


def device_seconds(events: list[tuple[float, Event]], only: list[PeerDone] | None = None) -> float:
    """Each trial's time on its peer, summed: from its ``TrialStarted`` (each attempt's) to its end;
    ``only``: of the trials these ``PeerDone`` ended."""
    started: dict[tuple[int, str], float] = {}
    spent = 0.0
    keep = None if only is None else {(e.trial, e.peer_id) for e in only}
    for at, event in events:
        match event:
            case TrialStarted(trial=trial, peer_id=peer):
                started[(trial, peer)] = at
            case PeerDone(trial=int() as trial) | PeerFailed(trial=int() as trial) | TrialPruned(trial=trial):
                begun = started.pop((trial, event.peer_id), None)
                if begun is not None and (keep is None or (trial, event.peer_id) in keep):
                    spent += at - begun
    return spent


async def search_once(
    client: httpx.AsyncClient, log: Log, st: Stack, dataset_id: str, search: dict[str, Any], peers: int, seed: int
) -> dict[str, Any]:
    """One search to its end: its best measured figure, device-seconds, trials done and pruned."""
    await wait_idle_peers(st.database_url, peers, timeout=120)
    body = {
        "dataset_id": dataset_id,
        "num_peers": peers,
        "hyperparameters": {"epochs": 10, "batch_size": 32, "lr": 0.003},
        "model": {"kind": "mlp", "hidden": [64]},
        "seed": seed,
        "search": search,
    }
    began = time.perf_counter()
    resp = await client.post("/sessions", json=body)
    if resp.status_code != 201:
        raise RuntimeError(f"POST /sessions: {resp.status_code} {resp.text[:300]}")
    sid: str = resp.json()["session_id"]
    await asyncio.wait_for(log.ended[sid].wait(), SEARCH_TIMEOUT_S)
    wall = time.perf_counter() - began
    events = log.events.pop(sid)
    end = next(e for _, e in events if isinstance(e, SessionCompleted | SessionFailed))
    if not isinstance(end, SessionCompleted):
        raise RuntimeError(f"search {sid} failed: {end.reason}")
    concluded = next(e for _, e in events if isinstance(e, SearchConcluded))
    assert concluded.best_value is not None, "the scheduler measured no finished trial"
    # the finished trials' own training time (their peers' PeerDone): the rest of their
    # device-seconds is what a trial costs besides its epochs
    done = [e for _, e in events if isinstance(e, PeerDone) and e.trial is not None]
    return {
        "best": concluded.best_value,
        "device_s": device_seconds(events),
        "train_s_of_done": sum(e.train_seconds for e in done),
        "device_s_of_done": device_seconds(events, done),
        "wall_s": wall,
        "done": concluded.done,
        "pruned": concluded.pruned,
        "failed": concluded.failed,
        "importances": concluded.importances,
        "best_params": concluded.best_params,
    }


async def run(fast: bool) -> Report:
    peers, budget, seeds = (2, 4, [0]) if fast else (4, 24, [0, 1, 2])
    space = QUICK_SPACE if fast else SPACE
    report = Report("search")
    results: dict[str, list[dict[str, Any]]] = {}
    began = time.perf_counter()
    with Stack("search") as st:
        st.start("projector")
        st.start("scheduler")
        st.start("gateway")
        st.wait_gateway()
        for i in range(peers):
            st.start("peer", "--name", f"bench{i}", "--device", "cpu", name=f"peer{i}")
        log = Log()
        nc = await nats.connect(st.nats_url)
        await nc.subscribe("session.*.events", cb=log.on_event)
        try:
            async with httpx.AsyncClient(base_url=st.gateway_url, timeout=60) as client:
                await signup(client)
                dataset_id = await upload_dataset(client)
                # not measured: every peer reads the dataset and warms torch up once, so the first
                # configuration measured pays no cost the others do not
                warm = {"space": QUICK_SPACE, "trials": peers, "sampler": "random", "seed": 99}
                await search_once(client, log, st, dataset_id, warm, peers, 99)
                for seed in seeds:
                    order = list(CONFIGS.items())
                    for name, conf in order[seed % 3 :] + order[: seed % 3]:  # each goes first once
                        search = {"space": space, "trials": budget, "seed": seed, **conf}
                        out = await search_once(client, log, st, dataset_id, search, peers, seed)
                        results.setdefault(name, []).append(out)
                        print(
                            f"seed {seed} {name}: best {out['best']:.4f}, {out['device_s']:.1f} device-s, "
                            f"{out['wall_s']:.1f} s wall, {out['done']} done, {out['pruned']} pruned",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            await nc.drain()
    base = results[BASE]
    base_best = statistics.mean(r["best"] for r in base)
    base_s = statistics.mean(r["device_s"] for r in base)
    for name, runs in results.items():
        best = statistics.mean(r["best"] for r in runs)
        spent = statistics.mean(r["device_s"] for r in runs)
        ref = {} if name == BASE else {"reference_name": BASE}
        report.add(f"{name}: best val accuracy (mean of {len(runs)} seeds)", best, "acc", **ref, reference=base_best)
        row = report.add(f"{name}: device-seconds (mean)", spent, "s", **ref, reference=base_s)
        if name == "random + asha":
            row.target = "<= 1/3 of unpruned, within 1 point"
            row.met = spent <= base_s / 3 and best >= base_best - 0.01
    fixed = [(r["device_s_of_done"] - r["train_s_of_done"]) / r["done"] for r in base]
    report.add(
        f"{BASE}: device-seconds of a trial besides its epochs (mean)",
        statistics.mean(fixed),
        "s",
        note="a finished trial's TrialStarted -> PeerDone less its PeerDone.train_seconds",
    )
    report.extra = {
        "peers": f"{peers} peer processes, CPU, 1 torch thread each",
        "trials": budget,
        "seeds": seeds,
        "space": space,
        "pruner": PRUNER,
        "wall_s": round(time.perf_counter() - began, 1),
        "per_seed": {
            name: [
                {
                    k: round(v, 4) if isinstance(v, float) else v
                    for k, v in r.items()
                    if k not in ("importances", "best_params")
                }
                for r in runs
            ]
            for name, runs in results.items()
        },
        "importances (tpe + asha, seed 0)": results["tpe + asha"][0]["importances"],
        "best config (tpe + asha, seed 0)": results["tpe + asha"][0]["best_params"],
    }
    return report


def main(argv: list[str] | None = None) -> Report:
    return asyncio.run(run(quick(argv)))


if __name__ == "__main__":
    show(main())
