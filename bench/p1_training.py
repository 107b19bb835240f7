"""P1 training overhead: a peer training through the platform vs a bare PyTorch loop, interleaved.

A (platform): one real ``swarmtrain peer`` process (1 torch thread, as ``swarmtrain up`` runs it);
the benchmark plays the scheduler: it sends ``Train`` on ``peer.<id>.command`` and times, from the
stream, the peer's ``Heartbeat`` per epoch and its ``PeerDone``.

B (bare): a fresh Python process with 1 torch thread and the same tensors (the same CSV, split and
standardization), the same model (``build_model``, same seed), batch size, Adam, shuffling and the
same validation pass (loss and accuracy on the validation split) after every epoch. Nothing else.

Figures: samples/s end to end (``Train`` sent → ``PeerDone`` seen; the bare run's loop time) and
per epoch (median gap between heartbeats; the bare run's median epoch incl. validation).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench._common import Report, Stack, cli_output, median
from swarmtrain.common import blob, bus
from swarmtrain.common.events import (
    Heartbeat,
    Hyperparameters,
    ModelSpec,
    PeerDone,
    PeerFailed,
    PeerRegistered,
    Train,
    decode_event,
    new_id,
)

ROWS, FEATURES, CLASSES = 20_000, 64, 10
EPOCHS, BATCH, LR, HIDDEN = 30, 64, 1e-3, [128, 64]
PAIRS = 4
VALIDATION_SPLIT, SEED = 0.2, 7


def make_csv(path: Path) -> None:
    """Gaussian blobs: ``CLASSES`` centres in ``FEATURES`` dimensions, learnable but not trivially."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.5, (CLASSES, FEATURES))
    labels = rng.integers(0, CLASSES, ROWS)
    x = centres[labels] + rng.normal(0, 2.0, (ROWS, FEATURES))
    with path.open("w") as f:
        f.write(",".join(f"f{i}" for i in range(FEATURES)) + ",label\n")
        for row, label in zip(x, labels, strict=True):
            f.write(",".join(f"{v:.5f}" for v in row) + f",c{label}\n")


# ------------------------------------------------------------------ B: the bare loop (own process)


def bare(csv_path: Path, epochs: int) -> dict[str, object]:
    import torch
    from torch import nn

    from swarmtrain.training.data import load_csv, split_indices
    from swarmtrain.training.model import build_model

    torch.set_num_threads(1)
    data = load_csv(csv_path, "label")
    train_idx, val_idx = split_indices(len(data), VALIDATION_SPLIT, SEED)
    x, y = data.features[train_idx], data.labels[train_idx]
    xv, yv = data.features[val_idx], data.labels[val_idx]
    torch.manual_seed(SEED)
    model = build_model(ModelSpec(hidden=HIDDEN), x.shape[1], len(data.classes))
    model[0].fit(x)  # type: ignore[operator]
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    n = int(y.shape[0])
    epoch_s: list[float] = []
    start = time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        xs, ys = x[perm], y[perm]
        for i in range(0, n, BATCH):
            loss = loss_fn(model(xs[i : i + BATCH]), ys[i : i + BATCH])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            logits = model(xv)
            val_loss = float(loss_fn(logits, yv).item())
            val_acc = float((logits.argmax(dim=1) == yv).float().mean().item())
        epoch_s.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    return {"n_train": n, "total_s": total, "epoch_s": epoch_s, "val_loss": val_loss, "val_acc": val_acc}


def run_bare(csv_path: Path, epochs: int) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.p1_training", "--bare", str(csv_path), str(epochs)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------ A: through the platform


class Platform:
    def __init__(self, st: Stack, nc: NATS, peer_id: str, dataset: blob.BlobRef) -> None:
        self.st, self.nc, self.js, self.peer_id, self.dataset = st, nc, nc.jetstream(), peer_id, dataset

    async def train(self, epochs: int) -> dict[str, object]:
        sid = new_id()
        arrivals: list[float] = []
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def on_event(msg: Msg) -> None:
            now = time.perf_counter()
            match decode_event(msg.data):
                case Heartbeat():
                    arrivals.append(now)
                case PeerDone():
                    done.set_result(now)
                case PeerFailed() as failed:
                    done.set_exception(RuntimeError(f"peer failed: {failed.reason}"))

        sub = await self.nc.subscribe(f"session.{sid}.events", cb=on_event)
        store = blob.FileStore(self.st.blob_dir)
        command = Train(
            peer_id=self.peer_id,
            session_id=sid,
            dataset_uri=self.dataset.uri,
            dataset_sha256=self.dataset.sha256,
            label_column="label",
            model=ModelSpec(hidden=HIDDEN),
            hyperparameters=Hyperparameters(epochs=epochs, batch_size=BATCH, lr=LR),
            validation_split=VALIDATION_SPLIT,
            seed=SEED,
            output_uri=store.uri(f"sessions/{sid}/models/{self.peer_id}.safetensors"),
        )
        t0 = time.perf_counter()
        await bus.send(self.js, command)
        t_done = await asyncio.wait_for(done, 300)
        await sub.unsubscribe()
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return {
            "total_s": t_done - t0,
            "epoch_s": gaps,
            "first_heartbeat_s": arrivals[0] - t0,
            "last_heartbeat_to_done_s": t_done - arrivals[-1],
        }


async def main() -> Report:
    report = Report("P1 training")
    with Stack("p1", postgres=False) as st:
        csv_path = st.dir / "blobs-data.csv"
        make_csv(csv_path)
        csv_bytes = csv_path.stat().st_size
        dataset = blob.FileStore(st.blob_dir).put_bytes("datasets/bench.csv", csv_path.read_bytes())
        nc = await nats.connect(st.nats_url)
        registered: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_peer(msg: Msg) -> None:
            event = decode_event(msg.data)
            if isinstance(event, PeerRegistered) and not registered.done():
                registered.set_result(event.peer_id)

        await bus.ensure_streams(nc.jetstream())
        psub = await nc.subscribe("peer.*.events", cb=on_peer)
        st.start("peer", "--name", "bench", "--device", "cpu")
        peer_id = await asyncio.wait_for(registered, 60)
        await psub.unsubscribe()
        platform = Platform(st, nc, peer_id, dataset)

        # warm-up: the peer caches the dataset, both sides load torch's kernels
        await platform.train(2)
        await asyncio.to_thread(run_bare, csv_path, 2)
        a_runs, b_runs = [], []
        for _ in range(PAIRS):
            a_runs.append(await platform.train(EPOCHS))
            b_runs.append(await asyncio.to_thread(run_bare, csv_path, EPOCHS))
        await nc.drain()

    n_train = int(b_runs[0]["n_train"])  # type: ignore[call-overload]
    samples = n_train * EPOCHS
    a_total = [samples / float(r["total_s"]) for r in a_runs]  # type: ignore[arg-type]
    b_total = [samples / float(r["total_s"]) for r in b_runs]  # type: ignore[arg-type]
    a_epoch = [n_train / median(r["epoch_s"]) for r in a_runs]  # type: ignore[arg-type]
    b_epoch = [n_train / median(r["epoch_s"]) for r in b_runs]  # type: ignore[arg-type]
    pair_ratios = [a / b for a, b in zip(a_total, b_total, strict=True)]
    common = {"reference_name": "bare torch loop", "target": ">= 0.95"}
    row = report.add("samples/s, Train -> PeerDone", median(a_total), "samples/s", reference=median(b_total), **common)
    row.met = (row.ratio or 0) >= 0.95
    row.note = "pair ratios " + ", ".join(f"{r:.3f}" for r in pair_ratios)
    row = report.add(
        "samples/s per epoch (heartbeats)", median(a_epoch), "samples/s", reference=median(b_epoch), **common
    )
    row.met = (row.ratio or 0) >= 0.95
    fixed = [float(a["total_s"]) - samples / e for a, e in zip(a_runs, a_epoch, strict=True)]  # type: ignore[arg-type]
    report.extra = {
        "dataset": f"{ROWS} rows x {FEATURES} features, {CLASSES} classes (CSV, {csv_bytes} bytes)",
        "job": f"mlp {HIDDEN}, {EPOCHS} epochs, batch {BATCH}, Adam lr {LR}, 1 torch thread, n_train {n_train}",
        "platform_total_s": [r["total_s"] for r in a_runs],
        "bare_total_s": [r["total_s"] for r in b_runs],
        "platform_first_heartbeat_s": [r["first_heartbeat_s"] for r in a_runs],
        "platform_fixed_s": fixed,
        "platform_last_heartbeat_to_done_s": [r["last_heartbeat_to_done_s"] for r in a_runs],
        "bare_val_acc": b_runs[-1]["val_acc"],
    }
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        print(json.dumps(bare(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        asyncio.run(main()).write(cli_output())
