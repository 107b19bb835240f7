"""fedavg that holds up: quality, robustness, non-IID and compression figures (issue 13), in-process.

No services: the rounds are simulated in this process with the peer's own pieces (the trainer's
``run_epoch`` with a fresh Adam per round and a shuffle seeded from (seed, shard, round), as the
peer's ``LocalLearner`` does; the pure rules of ``swarmtrain.peer.{aggregators,outer,compression,
sharding}``), so the figures measure the rules, not the wire. The one-peer reference is the real
``trainer.train`` a sweep runs, for ``rounds x local epochs`` epochs (the same sample-epochs).

Sections (all on 4 peers, MLP [128, 64], validation split 0.2; accuracy on the validation split):

- ``gap``: the validation-accuracy gap to one peer on all the data, on digits (examples/),
  scikit-learn's bundled breast_cancer, and a generated 7-class set whose label column sits in the
  middle; today's ``mean`` beside every built-in outer optimizer and the robust aggregators.
- ``poison``: one of four peers sends its delta sign-flipped, or scaled x100 (both pass the peer's
  only check, finite values of the right shapes): ``mean`` vs ``median``, ``trimmed_mean``,
  ``krum``, ``multi_krum``, against the clean run. With 4 peers Krum's rule n >= 2f + 3 allows
  only f = 0 (each update scored on its 2 nearest others), which still singles out one outlier.
- ``skew``: ``label_skew`` with alpha 0.1 and 1.0, with and without an outer optimizer.
- ``compression``: bytes per update and per round, and accuracy, for each compression.

    .venv/bin/python bench/fedavg_robust.py --quick        # one seed, 5 rounds x 1 epoch: a smoke run
    .venv/bin/python bench/fedavg_robust.py                # 3 seeds, 20 rounds x 2 epochs: the figures
    .venv/bin/python bench/fedavg_robust.py --sections poison compression --json out.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from swarmtrain.common.events import Hyperparameters, ModelSpec
from swarmtrain.common.fedopts import (
    AggregatorSpec,
    CompressionName,
    OuterSpec,
    ShardingSpec,
    check_aggregator,
    resolve_outer,
)
from swarmtrain.peer.aggregators import aggregate
from swarmtrain.peer.averaging import Tensors
from swarmtrain.peer.compression import METHODS, decode_update, encode_update
from swarmtrain.peer.model import Standardize
from swarmtrain.peer.outer import outer_step
from swarmtrain.peer.sharding import make_shards
from swarmtrain.peer.trainer import TrainJob, evaluate, load_data, run_epoch, seeded_model, train

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelSpec(hidden=[128, 64])
PEERS = 4
Attack = Literal["signflip", "scale100"]
ATTACK_FACTOR: dict[str, float] = {"signflip": -1.0, "scale100": 100.0}


# ------------------------------------------------------------------ datasets


def datasets(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (csv path, label column): two bundled data sets and a generated one."""
    from sklearn.datasets import load_breast_cancer, make_classification  # type: ignore[import-untyped]

    out = {"digits": (ROOT / "examples" / "digits.csv", "label")}

    cancer = load_breast_cancer()
    path = folder / "breast_cancer.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([f"f{i}" for i in range(cancer.data.shape[1])] + ["diagnosis"])
        for row, label in zip(cancer.data, cancer.target, strict=True):
            w.writerow([repr(float(v)) for v in row] + [str(cancer.target_names[label])])
    out["breast_cancer"] = (path, "diagnosis")

    x, y = make_classification(
        n_samples=3000,
        n_features=20,
        n_informative=12,
        n_redundant=4,
        n_classes=7,
        n_clusters_per_class=2,
        class_sep=1.5,
        random_state=0,
    )
    path = folder / "generated7.csv"
    middle = x.shape[1] // 2
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        names = [f"x{i}" for i in range(x.shape[1])]
        w.writerow([*names[:middle], "kind", *names[middle:]])
        for row, label in zip(x, y, strict=True):
            cells = [f"{float(v):.6g}" for v in row]
            w.writerow([*cells[:middle], f"kind-{label}", *cells[middle:]])
    out["generated7"] = (path, "kind")
    return out


# ------------------------------------------------------------------ simulation


@dataclass(frozen=True)
class Setting:
    aggregator: AggregatorSpec = field(default_factory=AggregatorSpec)
    outer: OuterSpec = field(default_factory=OuterSpec)
    compression: CompressionName = "none"
    sharding: ShardingSpec = field(default_factory=ShardingSpec)
    attack: Attack | None = None

    def label(self) -> str:
        a = self.aggregator
        parts: list[str] = [a.name]
        if a.name == "trimmed_mean":
            parts[-1] += f"(beta={a.beta})"
        elif a.name in ("krum", "multi_krum"):
            parts[-1] += f"(f={a.f}" + (f", m={a.m}" if a.m else "") + ")"
        o = resolve_outer(self.outer)
        if o.name != "none":
            extra = f", beta2={o.beta2}, eps={o.eps}" if o.name == "adam" else ""
            parts.append(f"{o.name}(lr={o.lr}, beta1={o.beta1}{extra})")
        if self.compression != "none":
            parts.append(self.compression)
        if self.sharding.name != "iid":
            parts.append(f"label_skew({self.sharding.alpha})")
        if self.attack:
            parts.append(f"attack={self.attack}")
        return " + ".join(parts)


@dataclass
class Outcome:
    val_accuracy: float
    bytes_per_update: float
    bytes_per_round: float
    selected: list[list[str]] = field(default_factory=list)
    histograms: list[list[int]] = field(default_factory=list)


def round_seed(seed: int, shard: int, round_: int) -> int:
    """As the peer's ``fedavg.round_seed``: the shuffle seed of a shard's round."""
    digest = hashlib.sha256(f"swarmtrain-fedavg/{seed}/{shard}/{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def simulate(csv_path: Path, label: str, hp: Hyperparameters, rounds: int, seed: int, s: Setting) -> Outcome:
    """One fedavg session of ``rounds`` rounds on ``PEERS`` peers, in this process."""
    job = TrainJob(csv_path=csv_path, label_column=label, model=MODEL, hyperparameters=hp, seed=seed)
    data, train_idx, val_idx = load_data(job)
    sharding = make_shards(s.sharding, train_idx, data.labels, PEERS, seed)
    model = seeded_model(MODEL, data.features.shape[1], len(data.classes), seed)
    standardize = model[0]
    assert isinstance(standardize, Standardize)
    standardize.fit(data.features[train_idx])
    x_val, y_val = data.features[val_idx], data.labels[val_idx]
    state: Tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    outer_state: dict[str, torch.Tensor] = {}
    stop = threading.Event()
    sent = 0
    selected = []
    for r in range(1, rounds + 1):
        updates = []
        for k, rows in enumerate(sharding.shards):
            peer_id = f"peer-{k}"
            model.load_state_dict(state)
            optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)
            shuffle = torch.Generator().manual_seed(round_seed(seed, k, r))
            x, y = data.features[rows], data.labels[rows]
            for e in range(hp.epochs):
                run_epoch(model, optimizer, x, y, hp.batch_size, shuffle, stop, e + 1)
            local = {name: t.detach().clone() for name, t in model.state_dict().items()}
            if s.attack and k == 0:
                factor = ATTACK_FACTOR[s.attack]
                local = {
                    n: (state[n].double() + factor * (t.double() - state[n].double())).to(t.dtype)
                    if t.is_floating_point()
                    else t
                    for n, t in local.items()
                }
            encoded = encode_update(local, state, s.compression)
            sent += encoded.nbytes
            updates.append((peer_id, decode_update(encoded.payload, state, s.compression), len(rows)))
        result = aggregate(s.aggregator, updates)
        selected.append(list(result.selected))
        state, outer_state = outer_step(s.outer, state, result.tensors, outer_state)
    model.load_state_dict(state)
    _, acc = evaluate(model, x_val, y_val)
    return Outcome(
        val_accuracy=float(acc or 0.0),
        bytes_per_update=sent / (rounds * PEERS),
        bytes_per_round=sent / rounds,
        selected=selected,
        histograms=sharding.histograms,
    )


def single_peer(csv_path: Path, label: str, hp: Hyperparameters, rounds: int, seed: int) -> float:
    """What a one-peer sweep reaches on all the training data in the same sample-epochs."""
    job = TrainJob(
        csv_path=csv_path,
        label_column=label,
        model=MODEL,
        hyperparameters=Hyperparameters(epochs=rounds * hp.epochs, batch_size=hp.batch_size, lr=hp.lr),
        seed=seed,
    )
    result = train(job, lambda stats: None, threading.Event())
    return float(result.final.val_accuracy or 0.0)


# ------------------------------------------------------------------ sections


class Bench:
    def __init__(self, args: argparse.Namespace, data: dict[str, tuple[Path, str]]) -> None:
        self.args = args
        self.data = data
        self.hp = Hyperparameters(epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr)
        self.results: dict[str, Any] = {}
        self._single: dict[tuple[str, int], float] = {}

    def single(self, dataset: str, seed: int) -> float:
        if (dataset, seed) not in self._single:
            path, label = self.data[dataset]
            self._single[dataset, seed] = single_peer(path, label, self.hp, self.args.rounds, seed)
        return self._single[dataset, seed]

    def run(self, dataset: str, setting: Setting) -> tuple[float, float, Outcome]:
        """(mean accuracy over the seeds, mean gap to one peer in points, the first seed's outcome)."""
        path, label = self.data[dataset]
        outcomes = [simulate(path, label, self.hp, self.args.rounds, seed, setting) for seed in self.args.seeds]
        accs = [o.val_accuracy for o in outcomes]
        gaps = [100 * (self.single(dataset, seed) - a) for seed, a in zip(self.args.seeds, accs, strict=True)]
        return statistics.fmean(accs), statistics.fmean(gaps), outcomes[0]

    def table(self, title: str, head: list[str], rows: Iterable[list[str]]) -> None:
        print(f"\n### {title}\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |", flush=True)

    def gap(self) -> None:
        settings = [
            Setting(),
            Setting(outer=OuterSpec(name="momentum", lr=1.0, beta1=0.5)),
            Setting(outer=OuterSpec(name="nesterov")),
            Setting(outer=OuterSpec(name="adam")),
            Setting(aggregator=AggregatorSpec(name="median")),
            Setting(aggregator=AggregatorSpec(name="trimmed_mean", beta=0.25)),
        ]
        rows, found = [], {}
        for dataset in self.args.datasets:
            single = statistics.fmean(self.single(dataset, seed) for seed in self.args.seeds)
            best: tuple[float, str] | None = None
            for s in settings:
                acc, gap, _ = self.run(dataset, s)
                found[f"{dataset}/{s.label()}"] = {"accuracy": acc, "gap_points": gap}
                rows.append([dataset, s.label(), f"{single:.4f}", f"{acc:.4f}", f"{gap:+.2f}"])
                if best is None or gap < best[0]:
                    best = (gap, s.label())
                print(f"  {dataset:<14} {s.label():<40} acc {acc:.4f} gap {gap:+.2f}", file=sys.stderr, flush=True)
            assert best is not None
            rows.append([dataset, f"**best: {best[1]}**", "", "", f"**{best[0]:+.2f}**"])
        self.results["gap"] = found
        self.table(
            "Gap to one peer on all the data (points; mean over seeds; target: best within 1)",
            ["dataset", "setting", "1 peer", "fedavg, 4 peers", "gap"],
            rows,
        )

    def poison(self) -> None:
        dataset = "digits"
        rules = [
            AggregatorSpec(name="mean"),
            AggregatorSpec(name="median"),
            AggregatorSpec(name="trimmed_mean", beta=0.25),
            AggregatorSpec(name="krum", f=0),
            AggregatorSpec(name="multi_krum", f=0, m=2),
        ]
        for rule in rules:
            assert check_aggregator(rule, PEERS) is None, rule
        clean, _, _ = self.run(dataset, Setting())
        rows = [["(clean run)", "mean", f"{clean:.4f}", "", ""]]
        found: dict[str, Any] = {"clean": clean}
        for attack in ("signflip", "scale100"):
            for rule in rules:
                s = Setting(aggregator=rule, attack=attack)
                acc, _, first = self.run(dataset, s)
                poisoned_in = sum("peer-0" in sel for sel in first.selected)
                chosen = f"{poisoned_in}/{len(first.selected)}" if rule.name in ("krum", "multi_krum") else "-"
                found[s.label()] = {"accuracy": acc, "vs_clean_points": 100 * (acc - clean)}
                rows.append([attack, s.label().split(" + ")[0], f"{acc:.4f}", f"{100 * (acc - clean):+.2f}", chosen])
                print(f"  {s.label():<50} acc {acc:.4f}", file=sys.stderr, flush=True)
        self.results["poison"] = found
        self.table(
            f"One of {PEERS} peers poisoned, {dataset} (target: robust rules within 2 points of clean)",
            ["attack", "aggregator", "accuracy", "vs clean (points)", "rounds the poisoned update was selected"],
            rows,
        )

    def skew(self) -> None:
        dataset = "digits"
        outers = [OuterSpec(), OuterSpec(name="momentum", lr=1.0, beta1=0.5), OuterSpec(name="nesterov")]
        outers += [OuterSpec(name="adam")]
        rows, found = [], {}
        for alpha in (0.1, 1.0):
            sharding = ShardingSpec(name="label_skew", alpha=alpha)
            for o in outers:
                s = Setting(outer=o, sharding=sharding)
                acc, gap, first = self.run(dataset, s)
                found[s.label()] = {"accuracy": acc, "gap_points": gap, "histograms_seed0": first.histograms}
                outer_label = s.label().split(" + ")[1] if o.name != "none" else "none"
                rows.append([str(alpha), outer_label, f"{acc:.4f}", f"{gap:+.2f}"])
                print(f"  {s.label():<50} acc {acc:.4f} gap {gap:+.2f}", file=sys.stderr, flush=True)
        self.results["skew"] = found
        self.table(
            f"label_skew on {dataset}: gap to one peer (points), with and without an outer optimizer",
            ["alpha", "outer", "accuracy", "gap"],
            rows,
        )

    def compression(self) -> None:
        dataset = "digits"
        rows, found = [], {}
        for method in METHODS:
            s = Setting(compression=method)
            acc, gap, first = self.run(dataset, s)
            found[method] = {"accuracy": acc, "gap_points": gap, "bytes_per_round": first.bytes_per_round}
            rows.append(
                [method, f"{first.bytes_per_update:,.0f}", f"{first.bytes_per_round:,.0f}", f"{acc:.4f}", f"{gap:+.2f}"]
            )
            print(f"  {method:<6} acc {acc:.4f}", file=sys.stderr, flush=True)
        self.results["compression"] = found
        self.table(
            f"Compression on {dataset} (tensor bytes, safetensors header aside)",
            ["compression", "bytes / update", "bytes / round", "accuracy", "gap"],
            rows,
        )


SECTIONS = ("gap", "poison", "skew", "compression")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, 5 rounds x 1 local epoch, two datasets")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer", "generated7"])
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.local_epochs, args.seeds = 5, 1, [0]
        args.datasets = [d for d in args.datasets if d != "breast_cancer"]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="swarmtrain-fedavg-robust-") as tmp:
        bench = Bench(args, datasets(Path(tmp)))
        print(
            f"## fedavg_robust: {PEERS} peers, MLP {MODEL.hidden}, {args.rounds} rounds x {args.local_epochs} "
            f"local epochs, batch {args.batch_size}, lr {args.lr}, seeds {args.seeds}"
        )
        for name in args.sections:
            getattr(bench, name)()
    print(f"\n({time.perf_counter() - started:.0f} s; `{' '.join(['bench/fedavg_robust.py', *sys.argv[1:]])}`)")
    if args.json:
        args.json.write_text(json.dumps(bench.results | {"args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
