"""A GPU run: the peer's training code ÷ a bare PyTorch loop on the same device, fp32 and bf16.

Workloads (issue 14): an MLP [1024, 1024, 512] on 100,000 x 128 rows (10 classes), and the CNN
(1x28x28 images, channels [16, 32], hidden [128]) on 50,000 rows. Each runs at fp32 and at bf16,
A (platform) and B (bare) interleaved, ``PAIRS`` times; the figure is samples/s of A over B.

A (platform): ``swarmtrain.peer.trainer.train``, the function a peer's worker thread runs for a
sweep ``Train`` (the model built from its spec and seed, standardization, Adam, the shuffled
batches, autocast for bf16, the validation pass and the epoch report after every epoch, the stop
flag checked before every batch). The dataset is already parsed (the peer's ``PARSED`` cache, as
for a peer's second session on a dataset), so the CSV parse is not timed. NATS and the blob store
are not in this loop: ``bench/p1_training.py`` measures that overhead with a real peer process.

B (bare): the same tensors, model, seed, optimizer, batch size, shuffling, autocast and
per-epoch validation, written as the plain loop a person would write. Nothing else.

GPU utilisation: ``nvidia-smi --query-gpu=utilization.gpu`` sampled every 0.2 s during each run
(mean of the samples); absent without nvidia-smi. On a machine without CUDA the same benchmark runs
small on the CPU and says that no GPU was found.

    python -m bench.gpu [--out FILE]

The four model kinds (mlp, cnn, resnet, transformer) on a GPU in bf16, with model FLOPs
utilisation: ``python -m bench.p1_training --device cuda --dtype bf16`` (issue 22's P1).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench._common import Report, median, quick, show
from swarmtrain.common.events import Hyperparameters, ModelSpec, Precision
from swarmtrain.common.models import CnnSpec, MlpSpec
from swarmtrain.peer import trainer
from swarmtrain.training.data import Dataset, split_indices
from swarmtrain.training.evaluation import EVAL_BATCH
from swarmtrain.training.model import Standardize, build_model

SEED, LR, VALIDATION_SPLIT, CLASSES = 7, 1e-3, 0.2, 10


@dataclass(frozen=True)
class Workload:
    name: str
    spec: ModelSpec
    rows: int
    features: int
    batch_size: int
    epochs: int


def workloads(gpu: bool, small: bool = False) -> list[Workload]:
    """The issue's sizes on a GPU; small ones on a CPU, so that the benchmark still runs there;
    ``small`` (``--quick``): tiny ones, a check that it runs."""
    mlp = MlpSpec(hidden=[1024, 1024, 512])
    cnn = CnnSpec(hidden=[128], input_shape=[1, 28, 28], channels=[16, 32])
    if small:
        return [Workload("mlp", mlp, 512, 128, 256, 1), Workload("cnn", cnn, 256, 784, 128, 1)]
    if gpu:
        return [Workload("mlp", mlp, 100_000, 128, 512, 3), Workload("cnn", cnn, 50_000, 784, 256, 2)]
    return [Workload("mlp", mlp, 4_000, 128, 256, 1), Workload("cnn", cnn, 1_000, 784, 128, 1)]


def synthetic(w: Workload) -> Dataset:
    """Learnable rows: each class a Gaussian around its own centre."""
    g = torch.Generator().manual_seed(SEED)
    labels = torch.randint(0, CLASSES, (w.rows,), generator=g)
    centres = torch.randn(CLASSES, w.features, generator=g)
    features = centres[labels] + torch.randn(w.rows, w.features, generator=g)
    return Dataset(
        features=features.float().contiguous(),
        labels=labels,
        classes=[str(i) for i in range(CLASSES)],
        feature_names=[f"f{i}" for i in range(w.features)],
        label_column="label",
    )


# ------------------------------------------------------------------ GPU utilisation


class Utilisation:
    """``nvidia-smi`` sampled in a thread while a run lasts; ``mean`` is None without nvidia-smi."""

    def __init__(self, index: int) -> None:
        self.exe = shutil.which("nvidia-smi")
        self.index = index
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        if self.exe is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        assert self.exe is not None
        query = [self.exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(self.index)]
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5, check=False).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                continue

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


# ------------------------------------------------------------------ A and B


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def platform(w: Workload, data: Dataset, device: torch.device, precision: Precision) -> float:
    """Samples/s of the peer's ``trainer.train`` (the parsed dataset cached, as on a second session)."""
    sha = hashlib.sha256(f"bench-gpu|{w.name}|{w.rows}|{w.features}".encode()).hexdigest()
    job = trainer.TrainJob(
        csv_path=Path(f"/nonexistent/{sha}.csv"),  # never read: the parsed tensors are in the cache
        label_column="label",
        model=w.spec,
        hyperparameters=Hyperparameters(epochs=w.epochs, batch_size=w.batch_size, lr=LR),
        validation_split=VALIDATION_SPLIT,
        seed=SEED,
        device=str(device),
        dataset_sha256=sha,
        precision=precision,
    )
    key = trainer.dataset_key(job)
    assert key is not None
    trainer.PARSED.put(key, data)
    sync(device)
    t0 = time.perf_counter()
    result = trainer.train(job, lambda stats: None, threading.Event())
    sync(device)
    return result.n_train * w.epochs / (time.perf_counter() - t0)


def bare(w: Workload, data: Dataset, device: torch.device, precision: Precision) -> float:
    """Samples/s of the plain loop: same tensors, model, optimizer, batches, autocast, validation."""
    sync(device)
    t0 = time.perf_counter()
    train_idx, val_idx = split_indices(len(data), VALIDATION_SPLIT, SEED)
    x, y = data.features[train_idx], data.labels[train_idx]
    xv, yv = data.features[val_idx], data.labels[val_idx]
    torch.manual_seed(SEED)
    model = build_model(w.spec, w.features, CLASSES)
    standardize = model[0]
    assert isinstance(standardize, Standardize)
    standardize.fit(x)
    model.to(device)
    x, y, xv, yv = x.to(device), y.to(device), xv.to(device), yv.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    dtype = torch.bfloat16 if precision == "bf16" else None
    shuffle = torch.Generator().manual_seed(SEED)
    n = len(y)
    for _ in range(w.epochs):
        model.train()
        perm = torch.randperm(n, generator=shuffle).to(device)
        for start in range(0, n, w.batch_size):
            idx = perm[start : start + w.batch_size]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(yv), EVAL_BATCH):
                model(xv[start : start + EVAL_BATCH]).argmax(dim=1).sum().item()
    sync(device)
    return n * w.epochs / (time.perf_counter() - t0)


def main() -> Report:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    pairs = 2 if gpu else 1
    report = Report("gpu")
    report.extra["device"] = trainer.describe_device(device) if gpu else "no GPU found: ran small on the CPU"
    report.extra["torch"] = torch.__version__
    if not gpu:
        print("bench.gpu: no GPU found (torch.cuda.is_available() is False): running small on the CPU")
    small = quick()
    for w in workloads(gpu, small):
        data = synthetic(w)
        precisions: tuple[Precision, ...] = ("fp32",) if small and not gpu else ("fp32", "bf16")
        for precision in precisions:
            try:
                trainer.Amp.for_device(precision, device)
            except trainer.PrecisionUnsupported as exc:
                report.extra[f"{w.name} {precision}"] = f"skipped: {exc}"
                continue
            a: list[float] = []
            b: list[float] = []
            util_a: list[float] = []
            util_b: list[float] = []
            bare(w, data, device, precision)  # warm-up: CUDA context, kernels, allocator
            for _ in range(pairs):
                with Utilisation(0) as u:
                    a.append(platform(w, data, device, precision))
                if u.mean is not None:
                    util_a.append(u.mean)
                with Utilisation(0) as u:
                    b.append(bare(w, data, device, precision))
                if u.mean is not None:
                    util_b.append(u.mean)
            label = f"{w.name} {precision}, {w.rows:,} rows x {w.features}"
            report.add(
                f"{label}: samples/s",
                median(a),
                "samples/s",
                reference=median(b),
                reference_name="bare loop",
                target="ratio >= 0.9" if gpu else "",
                met=(median(a) / median(b) >= 0.9) if gpu else None,
            )
            if util_a:
                report.add(f"{label}: GPU busy", median(util_a), "%", reference=median(util_b), reference_name="bare")
    return report


if __name__ == "__main__":
    show(main())
