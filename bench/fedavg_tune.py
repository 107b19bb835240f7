"""fedavg's defaults chosen from measurements (issue 22): each candidate's validation accuracy
against one peer on all the data for the same sample-epochs, on data sets it is tuned on and on
others it is only confirmed on.

In-process and real code: each peer is the peer's own ``LocalLearner`` on its shard (the sharding,
the local optimizer, the schedule, the shuffles as a peer has them), a round is the training
library's ``aggregate`` and ``outer_step`` (what ``rounds.apply_round`` runs on the updates it
fetched), and one peer on all the data is a ``LocalLearner`` of one shard trained for every epoch in
one round, keeping its optimizer (what a one-peer sweep does). No servers: what is measured here is
the numbers a session ends with, not the platform's speed.

    .venv/bin/python -m bench.fedavg_tune [--rounds 10] [--local-epochs 1] [--peers 4] [--seeds 0 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench._common import ROOT, quick
from swarmtrain.common.events import Hyperparameters, Train
from swarmtrain.common.fedopts import OuterSpec, RoundOptions
from swarmtrain.common.models import MlpSpec
from swarmtrain.peer.strategies.fedavg import LocalLearner
from swarmtrain.training.aggregators import aggregate
from swarmtrain.training.outer import outer_step


@dataclass(frozen=True)
class Candidate:
    name: str
    options: RoundOptions


CANDIDATES = (
    Candidate("adamw fresh per round, plain mean (before)", RoundOptions()),
    Candidate("adamw kept across rounds", RoundOptions(keep_local_optimizer=True)),
    Candidate("fresh, nesterov(0.7, 0.9)", RoundOptions(outer=OuterSpec(name="nesterov", lr=0.7))),
    Candidate(
        "kept, nesterov(0.7, 0.9)", RoundOptions(keep_local_optimizer=True, outer=OuterSpec(name="nesterov", lr=0.7))
    ),
    Candidate("fresh, momentum(1.0, 0.9)", RoundOptions(outer=OuterSpec(name="momentum", lr=1.0, beta1=0.9))),
    Candidate(
        "kept, momentum(1.0, 0.9)",
        RoundOptions(keep_local_optimizer=True, outer=OuterSpec(name="momentum", lr=1.0, beta1=0.9)),
    ),
    Candidate(
        "kept, momentum(1.0, 0.5)",
        RoundOptions(keep_local_optimizer=True, outer=OuterSpec(name="momentum", lr=1.0, beta1=0.5)),
    ),
    Candidate(
        "kept, nesterov(1.0, 0.5)",
        RoundOptions(keep_local_optimizer=True, outer=OuterSpec(name="nesterov", lr=1.0, beta1=0.5)),
    ),
    Candidate("fresh, nesterov(1.0, 0.9)", RoundOptions(outer=OuterSpec(name="nesterov", lr=1.0))),
    Candidate("fresh, nesterov(0.7, 0.95)", RoundOptions(outer=OuterSpec(name="nesterov", lr=0.7, beta1=0.95))),
    Candidate("fresh, nesterov(1.4, 0.9)", RoundOptions(outer=OuterSpec(name="nesterov", lr=1.4))),
    Candidate("fresh, adam(0.03)", RoundOptions(outer=OuterSpec(name="adam", lr=0.03))),
    Candidate("fresh, adam(0.01)", RoundOptions(outer=OuterSpec(name="adam", lr=0.01))),
)


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    header = ",".join([*(f"f{i}" for i in range(x.shape[1])), "label"])
    rows = np.column_stack([x, y]).astype(object)
    rows[:, -1] = [str(int(v)) for v in y]
    with path.open("w") as f:
        f.write(header + "\n")
        for row in rows:
            f.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n")
    return path


def datasets(scratch: Path, small: bool) -> dict[str, tuple[str, Path]]:
    """``name -> (role, csv)``: ``tune`` sets choose the default, ``confirm`` sets only check it."""
    from sklearn.datasets import load_breast_cancer, load_wine, make_classification  # type: ignore[import-untyped]

    found: dict[str, tuple[str, Path]] = {"digits": ("tune", ROOT / "examples" / "digits.csv")}
    bc = load_breast_cancer()
    found["breast_cancer"] = ("tune", _write_csv(scratch / "bc.csv", bc.data, bc.target))
    if small:
        return found
    gen_tune = make_classification(4000, 20, n_informative=12, n_classes=5, random_state=11)
    found["generated 5-class"] = ("tune", _write_csv(scratch / "g5.csv", *gen_tune))
    wine = load_wine()
    found["wine"] = ("confirm", _write_csv(scratch / "wine.csv", wine.data, wine.target))
    gen_confirm = make_classification(6000, 24, n_informative=14, n_classes=7, n_clusters_per_class=2, random_state=7)
    found["generated 7-class"] = ("confirm", _write_csv(scratch / "g7.csv", *gen_confirm))
    return found


def command(
    label: str, hp: Hyperparameters, seed: int, shard: int, shards: int, rounds: int, options: RoundOptions
) -> Train:
    return Train(
        peer_id=f"p{shard}",
        session_id="tune",
        dataset_uri="file:///unused",
        dataset_sha256="0" * 64,
        label_column=label,
        model=MlpSpec(hidden=[128, 64]),
        hyperparameters=hp,
        validation_split=0.2,
        seed=seed,
        output_uri="file:///unused",
        strategy="fedavg",
        shard=shard,
        num_shards=shards,
        rounds=rounds,
        rounds_uri="file:///rounds",
        round_options=options,
    )


def fedavg(
    path: Path, label: str, hp: Hyperparameters, seed: int, peers: int, rounds: int, options: RoundOptions
) -> float:
    learners = [
        LocalLearner(path, command(label, hp, seed, s, peers, rounds, options), torch_threads=1) for s in range(peers)
    ]
    model = learners[0].state()
    state: dict[str, torch.Tensor] = {}
    never = threading.Event()
    for r in range(1, rounds + 1):
        updates = []
        for learner in learners:
            learner.load(model)
            learner.train_round(r, lambda s: None, never)
            updates.append((learner.command.peer_id, learner.state(), learner.num_samples))
        agg = aggregate(options.aggregator, updates)
        model, state = outer_step(options.outer, model, agg.tensors, state)
    learners[0].load(model)
    _, accuracy = learners[0].evaluate_val()
    assert accuracy is not None
    return accuracy


def one_peer(path: Path, label: str, hp: Hyperparameters, seed: int, epochs: int) -> float:
    all_epochs = Hyperparameters(epochs=epochs, batch_size=hp.batch_size, lr=hp.lr)
    learner = LocalLearner(
        path, command(label, all_epochs, seed, 0, 1, 1, RoundOptions(keep_local_optimizer=True)), torch_threads=1
    )
    learner.train_round(1, lambda s: None, threading.Event())
    _, accuracy = learner.evaluate_val()
    assert accuracy is not None
    return accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=None, help="(bench.run) ignored: this benchmark prints its table")
    ap.add_argument("--pick", type=int, nargs="+", default=None, help="only these candidates (their indices)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    small = quick()
    rounds, seeds = (2, [0]) if small else (args.rounds, args.seeds)
    candidates: tuple[Candidate, ...] = CANDIDATES[:2] if small else CANDIDATES
    if args.pick:
        candidates = tuple(CANDIDATES[i] for i in args.pick)
    hp = Hyperparameters(epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr)
    torch.set_num_threads(1)
    print(
        f"MLP [128, 64], {rounds} rounds x {args.local_epochs} local epoch(s) on {args.peers} peers vs 1 peer "
        f"for {rounds * args.local_epochs} epochs on all the data; batch {args.batch_size}, lr {args.lr}, "
        f"validation split 0.2, seeds {seeds}. Gap = 1 peer - fedavg, points of validation accuracy, mean over seeds."
    )
    with tempfile.TemporaryDirectory(prefix="swarmtrain-tune-") as scratch:
        sets = datasets(Path(scratch), small)
        gaps: dict[tuple[str, str], float] = {}
        for name, (role, path) in sets.items():
            label = "label"
            base = [one_peer(path, label, hp, seed, rounds * args.local_epochs) for seed in seeds]
            print(f"\n{name} ({role}): 1 peer {statistics.mean(base):.4f}")
            for cand in candidates:
                accs = [fedavg(path, label, hp, seed, args.peers, rounds, cand.options) for seed in seeds]
                gap = 100 * statistics.mean(b - a for b, a in zip(base, accs, strict=True))
                gaps[(name, cand.name)] = gap
                print(f"  {cand.name:<44} fedavg {statistics.mean(accs):.4f}  gap {gap:+6.2f}", flush=True)
        print("\nmean gap over the tuning sets / over the confirming sets (points):")
        for cand in candidates:
            by_role = {
                role: [gaps[(n, cand.name)] for n, (r, _) in sets.items() if r == role] for role in ("tune", "confirm")
            }
            shown = "  ".join(f"{statistics.mean(v):+6.2f}" if v else "   n/a" for v in by_role.values())
            print(f"  {cand.name:<44} {shown}")


if __name__ == "__main__":
    main()
