"""P1 training overhead: the platform's training ÷ a bare PyTorch loop of the same model and data,
measured side by side in the same run (interleaved). Two parts:

**The stack** (CPU, fp32; the mlp). A (platform): the whole stack (nats-server, PostgreSQL,
projector, scheduler, gateway) and one real ``swarmtrain peer`` process (1 torch thread, as
``swarmtrain up`` runs it). The dataset is uploaded through the gateway and each run is a one-peer
sweep session requested with ``POST /sessions``; the benchmark times, from the bus, the
``Heartbeat`` facts (one per epoch: the peer's report, checked and appended by the scheduler) and
the ``PeerDone`` fact. B (bare): a fresh Python process with 1 torch thread and the same tensors
(the same CSV, split and standardization), the same model (``build_model``, same seed), batch
size, AdamW, shuffling and the same validation pass (loss and accuracy on the validation split)
after every epoch. Nothing else. Figures: samples/s end to end (``POST /sessions`` -> ``PeerDone``
fact seen; the bare run's loop time) and per epoch (median gap between heartbeats; the bare run's
median epoch incl. validation).

**The models** (``mlp``, ``cnn``, ``resnet``, ``transformer``; any device and precision). A: the
peer's ``trainer.train``, what its worker thread runs for a sweep's ``Train`` (the seeded model
built from its spec, standardization, the optimizer steps, autocast, the running loss and score,
the stop flag before every batch, validation and the epoch's report), on the parsed dataset in the
peer's cache (as for a peer's second session on a dataset: no parse timed). B: the plain loop,
same tensors, model, seed, AdamW, batches, shuffling, autocast and validation pass. A warm-up of
each, then pairs A B, B A, ...; samples/s (tokens/s for the language model) from the wall clock
and, on a CPU, per CPU second of the process too (what the work costs on a shared machine). Images:
scikit-learn's 8x8 digits upscaled (bilinear) on a CPU; generated class patterns at a GPU's sizes.
Text: a generated corpus (seeded words), byte tokens, windows of ``context`` tokens, as the
``language_modeling`` task cuts them; the text reader is not in this tree yet, so the windows are
put in the peer's parse cache as the reader would leave them. On a GPU: utilisation from
``nvidia-smi`` (``bench.gpu.Utilisation``) and model FLOPs utilisation: the contract's forward
FLOPs per sample (``ModelKindSpec.costs``) x (3 per training sample + 1 per validation sample)
per second, over the device's dense bf16 peak (``PEAK_BF16_TFLOPS`` or ``--peak-tflops``).

    python -m bench.p1_training [--quick] [--out FILE]              # the stack and the 4 models, CPU
    python -m bench.p1_training --device cuda --dtype bf16          # the 4 models on a GPU, bf16
    python -m bench.p1_training --no-stack --models resnet,transformer
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import nats
import numpy as np
import psutil
import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from torch import nn

from bench._common import Report, Stack, median, quick, show, signup, upload_dataset, wait_idle_peers
from swarmtrain.common.events import (
    BYTE_VOCAB,
    DataFormat,
    DataSpec,
    Heartbeat,
    Hyperparameters,
    ModelSpec,
    PeerDone,
    PeerFailed,
    Precision,
    SessionCompleted,
    SessionFailed,
    Task,
    decode_event,
)
from swarmtrain.common.models import CnnSpec, MlpSpec, ResnetSpec, TransformerSpec
from swarmtrain.peer import trainer
from swarmtrain.training.data import Dataset, split_indices
from swarmtrain.training.init import data_shape
from swarmtrain.training.model import Standardize, build_model
from swarmtrain.training.tasks.base import EVAL_BATCH
from swarmtrain.training.tasks.language_modeling import byte_tokens, windows

ROWS, FEATURES, CLASSES = (2_000, 16, 4) if quick() else (20_000, 64, 10)
EPOCHS, BATCH, LR, HIDDEN = (3 if quick() else 30), 64, 1e-3, [128, 64]
PAIRS = 1 if quick() else 4
MODEL_PAIRS = 3
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)  # the peer's default
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    n = int(y.shape[0])
    epoch_s: list[float] = []
    start, cpu0 = time.perf_counter(), time.process_time()
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
    total, cpu_s = time.perf_counter() - start, time.process_time() - cpu0
    return {
        "n_train": n,
        "total_s": total,
        "cpu_s": cpu_s,
        "epoch_s": epoch_s,
        "val_loss": val_loss,
        "val_acc": val_acc,
    }


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

    def __init__(self, st: Stack, nc: NATS, client: httpx.AsyncClient, dataset_id: str, peer_pid: int) -> None:
        self.st, self.nc, self.client, self.dataset_id = st, nc, client, dataset_id
        self.peer = psutil.Process(peer_pid)

    def peer_cpu_s(self) -> float:
        """The peer process's CPU seconds so far (all its threads: the training and the event loop)."""
        times = self.peer.cpu_times()
        return float(times.user + times.system)

    def peer_threads_s(self) -> dict[int, float]:
        """CPU seconds so far of each of the peer's threads, by thread id."""
        return {t.id: t.user_time + t.system_time for t in self.peer.threads()}

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
        t0, cpu0, threads0 = time.perf_counter(), self.peer_cpu_s(), self.peer_threads_s()
        resp = await self.client.post("/sessions", json=body)
        if resp.status_code != 201:
            raise RuntimeError(f"POST /sessions: {resp.status_code} {resp.text[:300]}")
        t_done = await asyncio.wait_for(done, 300)
        cpu_s = self.peer_cpu_s() - cpu0
        spent = sorted((v - threads0.get(k, 0.0) for k, v in self.peer_threads_s().items()), reverse=True)
        await asyncio.wait_for(ended, 60)  # its peer is free again for the next run
        await sub.unsubscribe()
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return {
            "total_s": t_done - t0,
            "cpu_s": cpu_s,
            "training_thread_cpu_s": spent[0] if spent else 0.0,
            "other_threads_cpu_s": sum(spent[1:]),
            "epoch_s": gaps or [t_done - t0],
            "first_heartbeat_s": arrivals[0] - t0,
            "last_heartbeat_to_done_s": t_done - arrivals[-1],
        }


# ------------------------------------------------------------------ the models: the peer's trainer vs a bare loop

MODELS = ("mlp", "cnn", "resnet", "transformer")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks (the vendors' datasheets, no sparsity) by a part of the device's
name, for model FLOPs utilisation; ``--peak-tflops`` overrides. H100 is the SXM part's figure."""


@dataclass(frozen=True, kw_only=True)
class TokenWindows(Dataset):
    """A language-modelling dataset as the peer holds it: ``features`` the token windows
    ``(rows, context)``, ``labels`` the same shifted by one token, and the vocabulary."""

    vocab: int = BYTE_VOCAB


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    spec: ModelSpec
    data: Dataset
    batch_size: int
    epochs: int
    lr: float = LR

    @property
    def tokens(self) -> int:
        """Tokens a sample is (a window's context for a language model; 1 otherwise)."""
        return int(self.data.features.shape[1]) if self.data.target == "language_modeling" else 1


def blobs(rows: int, features: int, classes: int) -> Dataset:
    """Learnable rows: each class a Gaussian around its own centre (as ``bench.gpu``)."""
    g = torch.Generator().manual_seed(SEED)
    labels = torch.randint(0, classes, (rows,), generator=g)
    centres = torch.randn(classes, features, generator=g)
    x = centres[labels] + torch.randn(rows, features, generator=g)
    return Dataset(
        features=x.float().contiguous(),
        labels=labels,
        classes=[str(i) for i in range(classes)],
        feature_names=[f"f{i}" for i in range(features)],
        label_column="label",
    )


def digits(size: int, copies: int = 1, channels: int = 1) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes) upscaled to ``size`` x ``size``
    (bilinear), ``channels`` times, each of ``copies`` copies with its own seeded pixel noise."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    raw = load_digits()
    images = torch.from_numpy(raw.images).float().div(16).unsqueeze(1)
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(SEED)
    x = torch.cat([images + 0.1 * torch.randn(images.shape, generator=g) for _ in range(copies)])
    x = x.expand(-1, channels, -1, -1).reshape(x.shape[0], -1).contiguous()
    labels = torch.from_numpy(raw.target).long().repeat(copies)
    return Dataset(
        features=x,
        labels=labels,
        classes=[str(i) for i in range(10)],
        feature_names=[f"p{i}" for i in range(x.shape[1])],
        label_column="label",
        image=(channels, size, size),
    )


def patterns(rows: int, size: int, channels: int, classes: int = 10) -> Dataset:
    """Generated images (no scikit-learn needed on a device): each class a smooth random template
    (4x4 noise upscaled to ``size``), each image its class's template plus its own noise."""
    g = torch.Generator().manual_seed(SEED)
    templates = torch.randn(classes, channels, 4, 4, generator=g)
    templates = nn.functional.interpolate(templates, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.randint(0, classes, (rows,), generator=g)
    x = torch.empty(rows, channels * size * size)
    for start in range(0, rows, 4096):  # in slices: the noise of 50,000 images at once is GiBs
        part = labels[start : start + 4096]
        noise = 0.5 * torch.randn(len(part), channels, size, size, generator=g)
        x[start : start + len(part)] = (templates[part] + noise).reshape(len(part), -1)
    return Dataset(
        features=x,
        labels=labels,
        classes=[str(i) for i in range(classes)],
        feature_names=[f"p{i}" for i in range(x.shape[1])],
        label_column="label",
        image=(channels, size, size),
    )


def corpus(rows: int, context: int) -> TokenWindows:
    """A generated English-like corpus (seeded words and sentences, no download), byte tokens, cut
    into ``rows`` windows of ``context`` tokens as the language-modelling task does (``windows``)."""
    rng = np.random.default_rng(SEED)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    weights = 1.0 / np.arange(1, 27)
    words = ["".join(rng.choice(letters, rng.integers(1, 9), p=weights / weights.sum())) for _ in range(400)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    need, text = rows * context + 1, []
    size = 0
    while size < need:
        sentence = " ".join(words[i] for i in rng.choice(len(words), rng.integers(4, 16), p=zipf / zipf.sum()))
        text.append(sentence.capitalize() + ". ")
        size += len(text[-1])
    x, y = windows(byte_tokens("".join(text)), context)
    return TokenWindows(
        features=x[:rows].contiguous(),
        labels=y[:rows].contiguous(),
        classes=[str(i) for i in range(BYTE_VOCAB)],
        feature_names=[f"t{i}" for i in range(context)],
        label_column="text",
        target="language_modeling",
    )


def cases(gpu: bool, small: bool, names: list[str]) -> list[Case]:
    """The four models at CPU sizes (one torch thread, seconds a run), the device's sizes on a GPU,
    or tiny ones (``--quick``: a check that it runs)."""
    mlp, cnn = MlpSpec(hidden=HIDDEN), CnnSpec(hidden=[128], input_shape=[1, 28, 28], channels=[16, 32])
    if small:
        made = {
            "mlp": lambda: Case(name="mlp", spec=mlp, data=blobs(512, 16, 4), batch_size=64, epochs=1),
            "cnn": lambda: Case(
                name="cnn",
                spec=CnnSpec(hidden=[16], input_shape=[1, 8, 8], channels=[4]),
                data=digits(8),
                batch_size=64,
                epochs=1,
            ),
            "resnet": lambda: Case(
                name="resnet", spec=ResnetSpec(depth=1, width=4, stages=2), data=digits(8), batch_size=64, epochs=1
            ),
            "transformer": lambda: Case(
                name="transformer",
                spec=TransformerSpec(layers=1, d_model=32, heads=2, context=16),
                data=corpus(128, 16),
                batch_size=32,
                epochs=1,
            ),
        }
    elif gpu:
        made = {
            "mlp": lambda: Case(
                name="mlp",
                spec=MlpSpec(hidden=[1024, 1024, 512]),
                data=blobs(100_000, 128, 10),
                batch_size=512,
                epochs=3,
            ),
            "cnn": lambda: Case(name="cnn", spec=cnn, data=patterns(50_000, 28, 1), batch_size=256, epochs=2),
            "resnet": lambda: Case(
                name="resnet",
                spec=ResnetSpec(depth=2, width=64, stages=3),
                data=patterns(50_000, 32, 3),
                batch_size=256,
                epochs=2,
            ),
            "transformer": lambda: Case(
                name="transformer",
                spec=TransformerSpec(layers=6, d_model=512, heads=8, context=256),
                data=corpus(16_384, 256),
                batch_size=64,
                epochs=2,
                lr=3e-4,
            ),
        }
    else:
        made = {
            "mlp": lambda: Case(name="mlp", spec=mlp, data=blobs(ROWS, FEATURES, CLASSES), batch_size=BATCH, epochs=8),
            "cnn": lambda: Case(name="cnn", spec=cnn, data=digits(28), batch_size=BATCH, epochs=2),
            "resnet": lambda: Case(name="resnet", spec=ResnetSpec(), data=digits(16), batch_size=BATCH, epochs=2),
            "transformer": lambda: Case(
                name="transformer",
                spec=TransformerSpec(layers=2, d_model=128, heads=4, context=64),
                data=corpus(800, 64),
                batch_size=32,
                epochs=2,
                lr=3e-4,
            ),
        }
    return [made[name]() for name in names]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def platform_run(case: Case, device: torch.device, precision: Precision) -> dict[str, Any]:
    """The peer's ``trainer.train`` (what its worker thread runs for a sweep's ``Train``) on the
    parsed dataset in its cache (``PARSED``, as for a peer's second session on a dataset):
    building the seeded model, standardization, the optimizer steps, autocast, the running loss
    and score, the stop flag before every batch, validation and the epoch's report."""
    sha = hashlib.sha256(f"bench-p1|{case.name}|{case.data.features.shape}".encode()).hexdigest()
    fmt_: DataFormat = "text" if case.data.target == "language_modeling" else "csv"
    job = trainer.TrainJob(
        csv_path=Path(f"/nonexistent/{sha}.csv"),  # never read: the parsed tensors are in the cache
        label_column=case.data.label_column,
        model=case.spec,
        hyperparameters=Hyperparameters(epochs=case.epochs, batch_size=case.batch_size, lr=case.lr),
        validation_split=VALIDATION_SPLIT,
        seed=SEED,
        device=str(device),
        torch_threads=1 if device.type == "cpu" else 0,
        dataset_sha256=sha,
        precision=precision,
        data=DataSpec(format=fmt_, task=cast(Task, case.data.target)),
    )
    key = trainer.dataset_key(job)
    assert key is not None
    trainer.PARSED.put(key, case.data)
    epochs: list[float] = []
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = trainer.train(job, lambda stats: epochs.append(stats.seconds), threading.Event())
    sync(device)
    return {
        "total_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "epoch_s": epochs,
        "n_train": result.n_train,
        "n_val": result.n_val,
    }


def bare_run(case: Case, device: torch.device, precision: Precision) -> dict[str, Any]:
    """The plain loop a person writes: the same tensors, seeded model, AdamW, batches, shuffling,
    autocast and the same validation pass (loss and accuracy) after every epoch. Nothing else."""
    data = case.data
    lm = data.target == "language_modeling"
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    train_idx, val_idx = split_indices(len(data), VALIDATION_SPLIT, SEED)
    x, y = data.features[train_idx], data.labels[train_idx]
    xv, yv = data.features[val_idx], data.labels[val_idx]
    torch.manual_seed(SEED)
    model = build_model(case.spec, x.shape[1], len(data.classes), data_shape(data))
    if isinstance(model[0], Standardize):
        model[0].fit(x)
    model.to(device)
    x, y, xv, yv = x.to(device), y.to(device), xv.to(device), yv.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=case.lr, weight_decay=0.0)  # the peer's default
    dtype = torch.bfloat16 if precision == "bf16" else None
    shuffle = torch.Generator().manual_seed(SEED)
    n, val_rows = len(y), max(1, EVAL_BATCH // case.tokens)
    epochs: list[float] = []
    for _ in range(case.epochs):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=shuffle).to(device)
        xs, ys = x[perm], y[perm]
        for start in range(0, n, case.batch_size):
            xb, yb = xs[start : start + case.batch_size], ys[start : start + case.batch_size]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(xb)
                loss = nn.functional.cross_entropy(out.flatten(0, 1), yb.flatten()) if lm else loss_fn(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        epochs.append(time.perf_counter() - t_epoch)
        model.eval()
        loss_sum, correct = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(yv), val_rows):
                out, yb = model(xv[start : start + val_rows]), yv[start : start + val_rows]
                flat = out.flatten(0, 1) if lm else out
                loss_sum += float(nn.functional.cross_entropy(flat, yb.flatten(), reduction="sum").item())
                correct += int((out.argmax(dim=-1) == yb).sum().item())
    sync(device)
    cpu_s = time.process_time() - c0
    return {"total_s": time.perf_counter() - t0, "cpu_s": cpu_s, "epoch_s": epochs, "n_train": n, "n_val": len(yv)}


loss_fn = nn.CrossEntropyLoss()


def peak_tflops(device: torch.device, precision: Precision) -> float | None:
    """The device's dense bf16 peak (``--peak-tflops`` first), None where unknown or not bf16."""
    if "--peak-tflops" in sys.argv:
        return float(sys.argv[sys.argv.index("--peak-tflops") + 1])
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16_TFLOPS.items() if part in name), None)


def measure_models(report: Report, device: torch.device, precision: Precision, names: list[str]) -> None:
    """Each model: a warm-up, then ``pairs`` runs of A (the trainer) and B (the bare loop), the
    order alternating (A B, B A, ...); the figure is the median of A's and B's throughputs, and
    the pair ratios in the note."""
    from bench.gpu import Utilisation

    gpu = device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(1)
    pairs = int(arg("--pairs", "1" if quick() else ("2" if gpu else str(MODEL_PAIRS))))
    peak = peak_tflops(device, precision)
    for case in cases(gpu, quick(), names):
        costs = case.spec.costs(data_shape(case.data))
        flops = costs.flops
        load = os.getloadavg()[0]
        warm = dataclasses.replace(case, epochs=1)
        bare_run(warm, device, precision)  # warm-up: kernels, allocator (and the CUDA context)
        platform_run(warm, device, precision)
        runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        busy: dict[str, list[float]] = {"A": [], "B": []}
        for i in range(pairs):
            for side in "AB" if i % 2 == 0 else "BA":
                with Utilisation(device.index or 0) if gpu else contextlib.nullcontext() as u:
                    run = platform_run if side == "A" else bare_run
                    runs[side].append(run(case, device, precision))
                if isinstance(u, Utilisation) and u.mean is not None:
                    busy[side].append(u.mean)
        n_train, n_val = int(runs["B"][0]["n_train"]), int(runs["B"][0]["n_val"])
        per_run = case.epochs * n_train * case.tokens
        unit = "tokens/s" if case.tokens > 1 else "samples/s"
        a = [per_run / r["total_s"] for r in runs["A"]]
        b = [per_run / r["total_s"] for r in runs["B"]]
        loop_a = [n_train * case.tokens / median(r["epoch_s"]) for r in runs["A"]]
        loop_b = [n_train * case.tokens / median(r["epoch_s"]) for r in runs["B"]]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        model_flops = case.epochs * (3 * n_train + n_val) * flops  # training is about 3x the forward
        tflops = model_flops / median([r["total_s"] for r in runs["A"]]) / 1e12
        label = f"{case.name} {precision}"
        row = report.add(
            f"{label}: {unit}, trainer.train vs bare",
            median(a),
            unit,
            reference=median(b),
            reference_name="bare torch loop",
            target=">= 0.95",
        )
        row.met = (row.ratio or 0) >= 0.95
        row.note = "pair ratios " + ", ".join(f"{r:.3f}" for r in ratios)
        if not gpu:  # CPU seconds of the process: what the work costs, whatever else the machine runs
            cpu_a = [per_run / r["cpu_s"] for r in runs["A"]]
            cpu_b = [per_run / r["cpu_s"] for r in runs["B"]]
            row = report.add(
                f"{label}: {unit} per CPU second",
                median(cpu_a),
                unit,
                reference=median(cpu_b),
                reference_name="bare torch loop",
                target=">= 0.95",
            )
            row.met = (row.ratio or 0) >= 0.95
            row.note = "best runs' ratio " + f"{max(cpu_a) / max(cpu_b):.3f}"
        if peak is not None:
            report.add(f"{label}: model FLOPs utilisation", 100 * tflops / peak, "%", note=f"peak {peak:g} TFLOP/s")
        if busy["A"]:
            report.add(f"{label}: GPU busy", median(busy["A"]), "%", reference=median(busy["B"]), reference_name="bare")
        report.extra[f"model {case.name}"] = {
            "spec": msgspec.to_builtins(case.spec),
            "data": f"{len(case.data):,} rows x {list(case.data.features.shape[1:])}"
            + (f", image {list(case.data.image)}" if case.data.image else "")
            + (", byte tokens" if case.tokens > 1 else ""),
            "job": f"{case.epochs} epochs, batch {case.batch_size}, AdamW lr {case.lr}, n {n_train} + {n_val} val",
            "forward_flops_per_sample": flops,
            "parameters": costs.parameters,
            "platform_tflops_per_s": tflops,
            "load_1min_before": load,
            "ratio_per_epoch_training_only": median(loop_a) / median(loop_b),
            "platform_total_s": [r["total_s"] for r in runs["A"]],
            "bare_total_s": [r["total_s"] for r in runs["B"]],
            "platform_cpu_s": [r["cpu_s"] for r in runs["A"]],
            "bare_cpu_s": [r["cpu_s"] for r in runs["B"]],
        }
        print(f"p1 {label}: ratio {median(a) / median(b):.3f} (pairs {ratios}); load {load:.1f}", flush=True)


async def measure_stack(report: Report) -> None:
    """The mlp through the whole stack and a real peer process (module docstring's A and B)."""
    report.extra["load_1min_before_stack"] = os.getloadavg()[0]
    with Stack("p1") as st:
        csv_path = st.dir / "blobs-data.csv"
        make_csv(csv_path)
        csv_bytes = csv_path.stat().st_size
        st.start("projector")
        st.start("scheduler")
        st.start("gateway")
        st.wait_gateway()
        peer = st.start("peer", "--name", "bench", "--device", "cpu")
        assert peer.proc is not None
        nc = await nats.connect(st.nats_url)
        async with httpx.AsyncClient(base_url=st.gateway_url, timeout=60) as client:
            await signup(client)
            dataset_id = await upload_dataset(client, csv_path)
            await wait_idle_peers(st.database_url, 1, timeout=120)
            platform = Platform(st, nc, client, dataset_id, peer.proc.pid)

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
    a_cpu = [samples / float(r["cpu_s"]) for r in a_runs]  # type: ignore[arg-type]
    b_cpu = [samples / float(r["cpu_s"]) for r in b_runs]  # type: ignore[arg-type]
    row = report.add(
        "samples/s per CPU second (the peer process)", median(a_cpu), "samples/s", reference=median(b_cpu), **common
    )
    row.met = (row.ratio or 0) >= 0.95
    row.note = "the peer's CPU from POST to PeerDone (all its threads) / the bare loop's"
    fixed = [float(a["total_s"]) - samples / e for a, e in zip(a_runs, a_epoch, strict=True)]  # type: ignore[arg-type]
    report.extra = {
        "dataset": f"{ROWS} rows x {FEATURES} features, {CLASSES} classes (CSV, {csv_bytes} bytes)",
        "job": f"mlp {HIDDEN}, {EPOCHS} epochs, batch {BATCH}, AdamW lr {LR}, 1 torch thread, n_train {n_train}",
        "platform_total_s": [r["total_s"] for r in a_runs],
        "bare_total_s": [r["total_s"] for r in b_runs],
        "platform_first_heartbeat_s": [r["first_heartbeat_s"] for r in a_runs],
        "platform_cpu_s": [r["cpu_s"] for r in a_runs],
        "platform_training_thread_cpu_s": [r["training_thread_cpu_s"] for r in a_runs],
        "platform_other_threads_cpu_s": [r["other_threads_cpu_s"] for r in a_runs],
        "bare_cpu_s": [r["cpu_s"] for r in b_runs],
        "platform_fixed_s": fixed,
        "platform_last_heartbeat_to_done_s": [r["last_heartbeat_to_done_s"] for r in a_runs],
        "bare_val_acc": b_runs[-1]["val_acc"],
    }
    print(f"p1 stack mlp: ratio {median(a_total) / median(b_total):.3f} (pairs {pair_ratios})", flush=True)


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> Report:
    """``--device cpu|cuda[:N]`` (cpu), ``--dtype fp32|bf16`` (fp32), ``--models mlp,cnn,...``
    (all four), ``--pairs N`` (the models' A/B pairs), ``--no-stack``: only the models' trainer
    against the bare loop (the stack's run is CPU fp32 only)."""
    device = trainer.resolve_device(arg("--device", "cpu"))
    precision = arg("--dtype", "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise SystemExit(f"--dtype: fp32, bf16 or fp16, not {precision!r}")
    names = [n for n in arg("--models", ",".join(MODELS)).split(",") if n]
    if unknown := sorted(set(names) - set(MODELS)):
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
    report = Report("P1 training")
    report.extra["device"] = trainer.describe_device(device)
    report.extra["torch"] = torch.__version__
    if device.type == "cpu":
        report.extra["gpu"] = "none: no device was used (CPU, 1 torch thread)"
    if device.type == "cpu" and precision == "fp32" and "--no-stack" not in sys.argv:
        asyncio.run(measure_stack(report))
    measure_models(report, device, precision, names)  # type: ignore[arg-type]
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        print(json.dumps(bare(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        show(main())
