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

import msgspec
import torch

from swarmtrain.common.blobkeys import update_uri
from swarmtrain.common.events import FEDAVG, Hyperparameters, RoundClosed, RoundUpdate, Train
from swarmtrain.common.fedopts import (
    AggregatorSpec,
    CompressionName,
    CompressionSpec,
    OuterSpec,
    RoundOptions,
    ShardingSpec,
    check_aggregator,
    resolve_outer,
)
from swarmtrain.common.models import MlpSpec
from swarmtrain.peer.strategies.fedavg import LocalLearner
from swarmtrain.peer.trainer import TrainJob, train
from swarmtrain.training.averaging import Tensors
from swarmtrain.training.compression import METHODS, encode_update
from swarmtrain.training.outer import State
from swarmtrain.training.rounds import apply_round, update_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = MlpSpec(hidden=[128, 64])
PEERS = 4
VALIDATION_SPLIT = 0.2
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
    max_norm: float | None = None
    keep_local_optimizer: bool = False

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
        if self.keep_local_optimizer:
            parts.append("keep_local_optimizer")
        if self.attack:
            parts.append(f"attack={self.attack}")
        if self.max_norm is not None:
            parts.append(f"max_update_norm={self.max_norm:g}")
        return " + ".join(parts)


@dataclass
class Outcome:
    val_accuracy: float
    bytes_per_update: float
    bytes_per_round: float
    selected: list[list[str]] = field(default_factory=list)
    histograms: list[list[int]] = field(default_factory=list)
    rejected: int = 0


def simulate(
    csv_path: Path, label: str, hp: Hyperparameters, rounds: int, seed: int, s: Setting, peers: int = PEERS
) -> Outcome:
    """One fedavg session of ``rounds`` rounds on ``peers`` peers, in this process, with the peer's
    own code: one :class:`LocalLearner` per shard (built from a ``Train`` as the peer builds it) and
    :func:`rounds.apply_round` over a ``RoundClosed`` naming every update, fetched from memory."""
    rounds_uri = "file:///bench/rounds"
    command = Train(
        peer_id="peer-0",
        session_id="bench",
        dataset_uri="file:///bench/data.csv",
        dataset_sha256="0" * 64,
        label_column=label,
        model=MODEL,
        hyperparameters=hp,
        validation_split=VALIDATION_SPLIT,
        seed=seed,
        output_uri="file:///bench/model.safetensors",
        strategy=FEDAVG,
        num_shards=peers,
        rounds=rounds,
        rounds_uri=rounds_uri,
        round_options=RoundOptions(
            aggregator=s.aggregator,
            outer=resolve_outer(s.outer),
            compression=CompressionSpec(name=s.compression),
            sharding=s.sharding,
            keep_local_optimizer=s.keep_local_optimizer,
            max_update_norm=s.max_norm,
        ),
    )
    learners = [
        LocalLearner(csv_path, msgspec.structs.replace(command, peer_id=f"peer-{k}", shard=k)) for k in range(peers)
    ]
    options = command.round_options
    reference = learners[0].reference
    state: Tensors = dict(reference)
    outer_state: State = {}
    stop = threading.Event()
    sent = 0
    selected: list[list[str]] = []
    rejected = 0
    for r in range(1, rounds + 1):
        files: dict[str, bytes] = {}
        updates: list[RoundUpdate] = []
        for k, learner in enumerate(learners):
            peer_id = f"peer-{k}"
            learner.load(state)
            learner.train_round(r, lambda stats: None, stop)
            local = learner.state()
            if s.attack and k == 0:
                factor = ATTACK_FACTOR[s.attack]
                local = {
                    n: (state[n].double() + factor * (t.double() - state[n].double())).to(t.dtype)
                    if t.is_floating_point()
                    else t
                    for n, t in local.items()
                }
            data = update_file(encode_update(local, state, s.compression).payload, s.compression)
            uri = update_uri(rounds_uri, r, peer_id)
            files[uri] = data
            sha = hashlib.sha256(data).hexdigest()
            updates.append(RoundUpdate(peer_id=peer_id, uri=uri, sha256=sha, num_samples=learner.num_samples))
        closed = RoundClosed(session_id="bench", round=r, updates=updates)

        def fetch(update: RoundUpdate, files: dict[str, bytes] = files) -> bytes:
            return files[update.uri]

        result = apply_round(closed, fetch, reference, state, outer_state, options, rounds_uri=rounds_uri)
        sent += result.update_bytes
        rejected += len(result.rejected)
        selected.append(list(result.selected))
        state, outer_state = result.model, result.state
    learners[0].load(state)
    _, acc = learners[0].evaluate_val()
    return Outcome(
        val_accuracy=float(acc or 0.0),
        bytes_per_update=sent / (rounds * peers),
        bytes_per_round=sent / rounds,
        selected=selected,
        histograms=learners[0].histograms,
        rejected=rejected,
    )


def single_peer(csv_path: Path, label: str, hp: Hyperparameters, rounds: int, seed: int) -> float:
    """What a one-peer sweep reaches on all the training data in the same sample-epochs."""
    job = TrainJob(
        csv_path=csv_path,
        label_column=label,
        model=MODEL,
        validation_split=VALIDATION_SPLIT,
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
        self.rejected = 0
        """Updates the norm bound (or anything else) rejected in the runs of the current row."""

    def single(self, dataset: str, seed: int) -> float:
        if (dataset, seed) not in self._single:
            path, label = self.data[dataset]
            self._single[dataset, seed] = single_peer(path, label, self.hp, self.args.rounds, seed)
        return self._single[dataset, seed]

    def run(self, dataset: str, setting: Setting, peers: int = PEERS) -> tuple[float, float, Outcome]:
        """(mean accuracy over the seeds, mean gap to one peer in points, the first seed's outcome)."""
        path, label = self.data[dataset]
        outcomes = [simulate(path, label, self.hp, self.args.rounds, seed, setting, peers) for seed in self.args.seeds]
        self.rejected += sum(o.rejected for o in outcomes)
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
        """Peer 0 sign-flips or scales x100 its delta every round. Every run here, the clean ones
        included, has ``max_update_norm`` = ``--max-norm``: loose enough that no x100 update is
        rejected (the table's last column says so), so the robust rules, not the bound, must hold.
        Krum with 4 peers may only assume f = 0 (n >= 2f + 3); Krum with f = 1 runs on 5 peers,
        against a clean run on 5 peers."""
        dataset = "digits"
        bound = self.args.max_norm
        rules = [
            AggregatorSpec(name="mean"),
            AggregatorSpec(name="median"),
            AggregatorSpec(name="trimmed_mean", beta=0.25),
            AggregatorSpec(name="krum", f=0),
            AggregatorSpec(name="multi_krum", f=0, m=2),
        ]
        for rule in rules:
            assert check_aggregator(rule, PEERS) is None, rule
        five = [AggregatorSpec(name="krum", f=1), AggregatorSpec(name="multi_krum", f=1)]
        for rule in five:
            assert check_aggregator(rule, PEERS + 1) is None, rule
        assert check_aggregator(AggregatorSpec(name="krum", f=1), PEERS) is not None
        head = ["peers", "attack", "aggregator", "accuracy", "vs clean (points)", "poisoned update selected"]
        head += ["updates rejected"]
        clean: dict[int, float] = {}
        rows: list[list[str]] = []
        found: dict[str, Any] = {}
        for peers in (PEERS, PEERS + 1):
            self.rejected = 0
            clean[peers], _, _ = self.run(dataset, Setting(max_norm=bound), peers)
            found[f"clean/{peers}"] = clean[peers]
            rows.append([str(peers), "(clean run)", "mean", f"{clean[peers]:.4f}", "", "", str(self.rejected)])
        for attack in ("signflip", "scale100"):
            for peers, rule in [(PEERS, r) for r in rules] + [(PEERS + 1, r) for r in five]:
                self.rejected = 0
                s = Setting(aggregator=rule, attack=attack, max_norm=bound)
                acc, _, first = self.run(dataset, s, peers)
                poisoned_in = sum("peer-0" in sel for sel in first.selected)
                chosen = f"{poisoned_in}/{len(first.selected)} rounds" if rule.name in ("krum", "multi_krum") else "-"
                vs = 100 * (acc - clean[peers])
                found[f"{peers}/{s.label()}"] = {"accuracy": acc, "vs_clean_points": vs, "rejected": self.rejected}
                name = s.label().split(" + ")[0]
                rows.append([str(peers), attack, name, f"{acc:.4f}", f"{vs:+.2f}", chosen, str(self.rejected)])
                print(f"  {peers} {s.label():<60} acc {acc:.4f} rejected {self.rejected}", file=sys.stderr, flush=True)
        self.results["poison"] = found
        self.table(
            f"One peer poisoned, {dataset}, max_update_norm {bound:g} (target: robust rules within 2 points of clean)",
            head,
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
            f"Compression on {dataset} (bytes of the update files, as the round facts count them)",
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
    ap.add_argument("--max-norm", type=float, default=1000.0, help="max_update_norm in the poison runs")
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
