"""A search's worth: random search without pruning against ``asha`` and ``tpe`` + ``asha``, the same
space and budget, several seeds: the best validation accuracy reached (the scheduler's own
measurement of the finished models) and the device-seconds spent, side by side in one run.

    python -m bench.search            # 4 peers, 24 trials, 3 seeds
    python -m bench.search --quick    # 2 peers, 4 trials, 1 seed: does it run?

What runs: the scheduler's own decisions (``decide``, the search's replay through Optuna, pruning,
evaluation, conclusion) over a state folded from the facts it appends, with ``num_peers`` peers
each reporting one epoch per decision (the log order of a swarm of equal peers); every trial is
trained for real on the CPU by the peer's trainer (``swarmtrain.peer.trainer.train``) on the
digits dataset, its heartbeats the epochs' real figures. Device-seconds are the measured seconds of
the epochs each trial ran before it ended (a pruned trial stops paying at its rung). The network
path (NATS, the gateway, the projector, peer processes) is the e2e test's (``tests/e2e/test_search.py``).
A trial's curve depends only on its point and the session's seed, so one trained curve serves every
configuration that suggests the same point (random search suggests the same points with or
without pruning).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import Any

import msgspec

from bench._common import ROOT, Report, quick, show
from swarmtrain.common.events import (
    Event,
    Heartbeat,
    Hyperparameters,
    MlpSpec,
    ModelEvaluated,
    PeerDone,
    PeerLocked,
    PeerRegistered,
    PeerWentOnline,
    Presence,
    SearchConcluded,
    SessionRequested,
    SessionStarted,
    Stop,
    Train,
)
from swarmtrain.common.search import SearchSpec
from swarmtrain.peer import trainer
from swarmtrain.scheduler import trials
from swarmtrain.scheduler.actions import Append, AppendIf, Clocks, Config, Evaluate, Send, Timing
from swarmtrain.scheduler.decide import decide
from swarmtrain.scheduler.state import State, fold, observe_presence

DIGITS = ROOT / "examples" / "digits.csv"
CONFIG = Config(uri=lambda key: f"file:///blobs/{key}", timing=Timing(peer_timeout=1e9, resend_after=1e9))
CLOCKS = Clocks(now=1.0, wall=1_700_000_000.0)
SPACE = {
    "lr": {"log_uniform": [1e-4, 1e-1]},
    "batch_size": {"choice": [32, 64, 128]},
    "epochs": {"int": [3, 12]},
    "model.hidden.0": {"choice": [16, 64, 128]},
}
CONFIGS = {
    "random, no pruning": {"sampler": "random", "pruner": {"name": "none"}},
    "random + asha": {"sampler": "random", "pruner": {"name": "asha", "min_epochs": 1, "reduction_factor": 3}},
    "tpe + asha": {"sampler": "tpe", "pruner": {"name": "asha", "min_epochs": 1, "reduction_factor": 3}},
}
Curve = list[tuple[float, float, float]]
"""Per epoch: (val_accuracy, val_loss, seconds)."""
CURVES: dict[str, Curve] = {}


def curve(train: Train) -> Curve:
    """The trial's real training, every epoch's figures and seconds (cached by point and seed)."""
    key = msgspec.json.encode([train.hyperparameters, train.model, train.seed]).decode()
    if key not in CURVES:
        out: Curve = []
        job = trainer.TrainJob(
            csv_path=DIGITS,
            label_column="label",
            model=train.model,
            hyperparameters=train.hyperparameters,
            validation_split=0.2,
            seed=train.seed,
            device="cpu",
            torch_threads=1,
        )

        def on_epoch(s: trainer.EpochStats) -> None:
            out.append((s.val_accuracy or 0.0, s.val_loss or 0.0, s.seconds))

        trainer.train(job, on_epoch, threading.Event())
        CURVES[key] = out
    return CURVES[key]


def reports(train: Train) -> list[tuple[Event, float]]:
    """What an honest peer reports for ``train``, each with the device-seconds of its epoch."""
    assert train.trial is not None
    figures = curve(train)
    out: list[tuple[Event, float]] = []
    for epoch, (acc, loss, seconds) in enumerate(figures, 1):
        beat = Heartbeat(
            event_id=f"{train.event_id}.epoch{epoch}",
            session_id=train.session_id,
            peer_id=train.peer_id,
            trial=train.trial,
            epoch=epoch,
            epochs=len(figures),
            loss=loss,
            accuracy=acc,
            val_loss=loss,
            val_accuracy=acc,
            samples_per_s=1.0,
        )
        out.append((beat, seconds))
    acc, loss, _ = figures[-1]
    done = PeerDone(
        event_id=f"{train.event_id}.done",
        session_id=train.session_id,
        peer_id=train.peer_id,
        trial=train.trial,
        model_uri=train.output_uri,
        model_sha256="0" * 64,
        epochs=len(figures),
        loss=loss,
        accuracy=acc,
        val_loss=loss,
        val_accuracy=acc,
        train_seconds=sum(s for _, _, s in figures),
    )
    out.append((done, 0.0))
    return out


def search_once(spec: SearchSpec, seed: int, peers: int) -> dict[str, Any]:
    """One search to its end; its best measured figure, device-seconds, trials done and pruned."""
    sid = f"s{seed}"
    state = State()
    names = [f"p{i}" for i in range(peers)]
    for p in names:
        state = fold(state, [(0, PeerRegistered(peer_id=p, name=p, device="cpu"), 0.0)])
        state = fold(state, [(0, PeerWentOnline(peer_id=p), 0.0)])
        state = observe_presence(state, Presence(peer_id=p, name=p, device="cpu"), 0.0)
    request = SessionRequested(
        session_id=sid,
        owner_id="u",
        dataset_id="d",
        dataset_uri="file:///d.csv",
        dataset_sha256="0",
        label_column="label",
        num_peers=peers,
        model=MlpSpec(hidden=[64]),
        hyperparameters=[Hyperparameters(epochs=6, batch_size=64, lr=0.003)],
        seed=seed,
        search=spec,
    )
    seq = state.position
    facts: list[Event] = [request, *(PeerLocked(peer_id=p, session_id=sid) for p in names)]
    facts.append(SessionStarted(session_id=sid, assignments={}))
    pending: dict[str, list[tuple[Event, float]]] = {}
    seen: set[str] = set()
    device_s = 0.0
    for _ in range(100_000):
        items = []
        for event in facts:
            seq += 1
            items.append((seq, event, 0.0))
        state = fold(state, items)
        session = state.sessions[sid]
        if session.status != "running":
            break
        facts = []
        for action in decide(state, CLOCKS, CONFIG):
            match action:
                case Append(event=event) | AppendIf(event=event) if event.event_id not in seen:
                    seen.add(event.event_id)
                    facts.append(event)
                case Send(command=Train() as train) if train.event_id not in seen:
                    seen.add(train.event_id)
                    pending[train.peer_id] = reports(train)
                case Send(command=Stop(trial=trial) as stop) if trial is not None and stop.event_id not in seen:
                    seen.add(stop.event_id)
                    queue = pending.get(stop.peer_id, [])
                    if queue and getattr(queue[0][0], "trial", None) == trial:
                        pending[stop.peer_id] = []
                case Evaluate(peer_id=peer, trial=trial) if f"{sid}.{peer}.{trial}.ev" not in seen:
                    seen.add(f"{sid}.{peer}.{trial}.ev")
                    run = session.runs[f"trial{trial}"]
                    facts.append(
                        ModelEvaluated(
                            event_id=f"{sid}.{peer}.trial{trial}.evaluated",
                            session_id=sid,
                            peer_id=peer,
                            trial=trial,
                            val_accuracy=run.val_accuracy,
                            model_sha256="0" * 64,
                        )
                    )
        for peer in sorted(pending):
            if pending[peer]:
                event, seconds = pending[peer].pop(0)
                device_s += seconds
                facts.append(event)
    session = state.sessions[sid]
    concluded = session.concluded
    assert isinstance(concluded, SearchConcluded) and session.status == "completed", session.status
    trials.forget(sid)
    return {
        "best": concluded.best_value,
        "device_s": device_s,
        "done": concluded.done,
        "pruned": concluded.pruned,
        "importances": concluded.importances,
        "best_params": concluded.best_params,
    }


def main(argv: list[str] | None = None) -> Report:
    fast = quick(argv)
    peers, budget, seeds = (2, 4, [0]) if fast else (4, 24, [0, 1, 2])
    report = Report("search")
    results: dict[str, list[dict[str, Any]]] = {}
    began = time.perf_counter()
    for seed in seeds:
        for name, conf in CONFIGS.items():
            spec = msgspec.convert({"space": SPACE, "trials": budget, **conf}, SearchSpec)
            out = search_once(spec, seed, peers)
            results.setdefault(name, []).append(out)
            print(
                f"seed {seed} {name}: best {out['best']:.4f}, {out['device_s']:.1f} device-s, "
                f"{out['done']} done, {out['pruned']} pruned",
                file=sys.stderr,
                flush=True,
            )
    base = results["random, no pruning"]
    base_best = statistics.mean(r["best"] for r in base)
    base_s = statistics.mean(r["device_s"] for r in base)
    for name, runs in results.items():
        best = statistics.mean(r["best"] for r in runs)
        spent = statistics.mean(r["device_s"] for r in runs)
        ref = {} if name == "random, no pruning" else {"reference_name": "random, no pruning"}
        report.add(f"{name}: best val accuracy (mean of {len(runs)} seeds)", best, "acc", **ref, reference=base_best)
        row = report.add(f"{name}: device-seconds (mean)", spent, "s", **ref, reference=base_s)
        if name == "random + asha":
            row.target = "<= 1/3 of unpruned, within 1 point"
            row.met = spent <= base_s / 3 and best >= base_best - 0.01
    report.extra = {
        "peers": peers,
        "trials": budget,
        "seeds": seeds,
        "space": SPACE,
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
    }
    return report


if __name__ == "__main__":
    show(main())
