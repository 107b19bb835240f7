"""P1 training overhead: a peer training through the platform vs a bare PyTorch loop, interleaved.

A (platform): the whole stack (nats-server, PostgreSQL, projector, scheduler, gateway) and one real
``swarmtrain peer`` process (1 torch thread, as ``swarmtrain up`` runs it). The dataset is uploaded
through the gateway and each run is a one-peer sweep session requested with ``POST /sessions``;
the benchmark times, from the bus, the ``Heartbeat`` facts (one per epoch: the peer's report,
checked and appended by the scheduler) and the ``PeerDone`` fact.

B (bare): a fresh Python process with 1 torch thread and the same tensors (the same CSV, split and
standardization), the same model (``build_model``, same seed), batch size, Adam, shuffling and the
same validation pass (loss and accuracy on the validation split) after every epoch. Nothing else.

Figures: samples/s end to end (``POST /sessions`` -> ``PeerDone`` fact seen; the bare run's loop
time) and per epoch (median gap between heartbeats; the bare run's median epoch incl. validation).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench._common import Report, Stack, cli_output, median, quick, signup, upload_dataset, wait_idle_peers
from swarmtrain.common.events import (
    DataSpec,
    Heartbeat,
    PeerDone,
    PeerFailed,
    SessionCompleted,
    SessionFailed,
    decode_event,
)
from swarmtrain.common.models import MlpSpec

ROWS, FEATURES, CLASSES = (2_000, 16, 4) if quick() else (20_000, 64, 10)
EPOCHS, BATCH, LR, HIDDEN = (3 if quick() else 30), 64, 1e-3, [128, 64]
PAIRS = 1 if quick() else 4
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

    from swarmtrain.training.data import load, split_indices
    from swarmtrain.training.model import build_model

    torch.set_num_threads(1)
    data = load(csv_path, DataSpec(), "label")
    train_idx, val_idx = split_indices(len(data), VALIDATION_SPLIT, SEED)
    x, y = data.features[train_idx], data.labels[train_idx]
    xv, yv = data.features[val_idx], data.labels[val_idx]
    torch.manual_seed(SEED)
    model = build_model(MlpSpec(hidden=HIDDEN), x.shape[1], len(data.classes))
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
    """One-peer sweep sessions through the gateway, timed from the bus."""

    def __init__(self, st: Stack, nc: NATS, client: httpx.AsyncClient, dataset_id: str) -> None:
        self.st, self.nc, self.client, self.dataset_id = st, nc, client, dataset_id

    async def train(self, epochs: int) -> dict[str, object]:
        await wait_idle_peers(self.st.database_url, 1)
        arrivals: list[float] = []
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_event(msg: Msg) -> None:
            now = time.perf_counter()
            match decode_event(msg.data):
                case Heartbeat():
                    arrivals.append(now)
                case PeerDone() if not done.done():
                    done.set_result(now)
                case PeerFailed() as failed if not done.done():
                    done.set_exception(RuntimeError(f"peer failed: {failed.reason}"))
                case SessionCompleted() | SessionFailed() if not ended.done():
                    ended.set_result(None)

        body = {
            "dataset_id": self.dataset_id,
            "num_peers": 1,
            "hyperparameters": {"epochs": epochs, "batch_size": BATCH, "lr": LR},
            "model": {"hidden": HIDDEN},
            "validation_split": VALIDATION_SPLIT,
            "seed": SEED,
        }
        sub = await self.nc.subscribe("session.*.events", cb=on_event)
        t0 = time.perf_counter()
        resp = await self.client.post("/sessions", json=body)
        if resp.status_code != 201:
            raise RuntimeError(f"POST /sessions: {resp.status_code} {resp.text[:300]}")
        t_done = await asyncio.wait_for(done, 300)
        await asyncio.wait_for(ended, 60)  # its peer is free again for the next run
        await sub.unsubscribe()
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return {
            "total_s": t_done - t0,
            "epoch_s": gaps or [t_done - t0],
            "first_heartbeat_s": arrivals[0] - t0,
            "last_heartbeat_to_done_s": t_done - arrivals[-1],
        }


async def main() -> Report:
    report = Report("P1 training")
    with Stack("p1") as st:
        csv_path = st.dir / "blobs-data.csv"
        make_csv(csv_path)
        csv_bytes = csv_path.stat().st_size
        st.start("projector")
        st.start("scheduler")
        st.start("gateway")
        st.wait_gateway()
        st.start("peer", "--name", "bench", "--device", "cpu")
        nc = await nats.connect(st.nats_url)
        async with httpx.AsyncClient(base_url=st.gateway_url, timeout=60) as client:
            await signup(client)
            dataset_id = await upload_dataset(client, csv_path)
            await wait_idle_peers(st.database_url, 1, timeout=120)
            platform = Platform(st, nc, client, dataset_id)

            if not quick():  # warm-up: the peer caches the dataset, both sides load torch's kernels
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
    row = report.add(
        "samples/s, POST /sessions -> PeerDone", median(a_total), "samples/s", reference=median(b_total), **common
    )
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
