"""The training itself: a plain blocking function, meant to run in a worker thread.

Nothing here touches the event loop or the network. Progress goes out through ``on_epoch`` (called
in the worker thread), and a ``threading.Event`` checked before every batch stops it promptly.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch
from torch import nn

from swarmtrain.common.events import Hyperparameters, ModelSpec
from swarmtrain.peer.data import DataError, Dataset, load_csv, split_indices
from swarmtrain.peer.model import ModelMetadata, Standardize, build_model

# Model initialisation seeds torch's global generator; the lock keeps two trainings in one process
# from interleaving there, fork_rng keeps everyone else's random state as it was.
_init_lock = threading.Lock()


class TrainingStopped(Exception):
    """The stop flag was set; the training ended before its last epoch."""


class Diverged(Exception):
    """A loss that is not a finite number: the run diverged (most often a learning rate far too high).

    Its message is the ``PeerFailed`` reason; no figure of the epoch is reported (a report never
    carries NaN or Inf)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"diverged: non-finite loss at epoch {epoch}")
        self.epoch = epoch


def check_finite(epoch: int, *losses: float | None) -> None:
    """``Diverged`` at ``epoch`` if a loss is NaN or infinite (``None``: no rows to measure on)."""
    if any(loss is not None and not math.isfinite(loss) for loss in losses):
        raise Diverged(epoch)


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    csv_path: Path
    label_column: str
    model: ModelSpec
    hyperparameters: Hyperparameters
    validation_split: float = 0.2
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    torch_threads: int = 0
    """Torch intra-op threads; 0 leaves torch's default."""
    init: Mapping[str, torch.Tensor] | None = None
    """The starting model's tensors (``Train.init_url``), loaded after the standardization is fitted."""


class EpochStats(msgspec.Struct, frozen=True, kw_only=True):
    epoch: int
    epochs: int
    loss: float
    """Mean training loss over the epoch (running, while the weights moved)."""
    accuracy: float
    """Training accuracy over the epoch (running)."""
    val_loss: float | None
    val_accuracy: float | None
    samples_per_s: float
    seconds: float
    """Wall time of the epoch's training steps."""


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    model: nn.Sequential
    """The trained model, on CPU, in eval mode."""
    metadata: ModelMetadata
    final: EpochStats
    train_seconds: float
    n_train: int
    n_val: int


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when available, else CPU. Asking for absent CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unsupported device {requested!r}: use auto, cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was asked for but no CUDA device is available")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"no CUDA device {index} (found {torch.cuda.device_count()})")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"unsupported device {requested!r}: use auto, cpu or cuda")
    return device


def describe_device(device: torch.device) -> str:
    """``cpu`` or e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        index = device.index or 0
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def _check(hp: Hyperparameters) -> None:
    if hp.epochs < 1 or hp.batch_size < 1 or not (math.isfinite(hp.lr) and hp.lr > 0):
        raise DataError(f"invalid hyperparameters: epochs={hp.epochs} batch_size={hp.batch_size} lr={hp.lr}")


def load_data(job: TrainJob) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """The job's dataset and its (train, validation) row indexes; a DataError if it cannot be trained on."""
    _check(job.hyperparameters)
    data = load_csv(job.csv_path, job.label_column)
    if len(data.classes) < 2:
        raise DataError(f"the label column has {len(data.classes)} class; at least 2 are needed")
    train_idx, val_idx = split_indices(len(data), job.validation_split, job.seed)
    return data, train_idx, val_idx


def seeded_model(spec: ModelSpec, n_features: int, n_classes: int, seed: int) -> nn.Sequential:
    """``build_model`` from ``torch.manual_seed(seed)``: the same initial weights on every machine.

    A spec that does not fit the data (a cnn's ``input_shape``) is a DataError.
    """
    with _init_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return build_model(spec, n_features, n_classes)
        except ValueError as exc:
            raise DataError(str(exc)) from None


def metadata_for(spec: ModelSpec, data: Dataset) -> ModelMetadata:
    return ModelMetadata.for_spec(
        spec, classes=data.classes, feature_names=data.feature_names, label_column=data.label_column
    )


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: torch.Generator,
    stop: threading.Event,
    epoch: int,
) -> tuple[float, float, float]:
    """One pass over ``(x, y)`` in a shuffled order: ``(mean loss, accuracy, seconds)``, both running.

    Raises ``TrainingStopped`` before any batch once ``stop`` is set, ``Diverged`` when the epoch's
    loss is not finite.
    """
    device = x.device
    n = int(y.shape[0])
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=shuffle).to(device)
    xs, ys = x[perm], y[perm]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, n, batch_size):
        if stop.is_set():
            raise TrainingStopped(f"stopped in epoch {epoch}")
        xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
        logits = model(xb)
        loss = loss_fn(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * yb.shape[0]
        correct += (logits.detach().argmax(dim=1) == yb).sum()
    train_loss, train_correct = loss_sum.item() / n, int(correct.item())  # syncs the device
    check_finite(epoch, train_loss)
    return train_loss, train_correct / n, time.perf_counter() - t0


EVAL_BATCH = 4096


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, float | None]:
    """``(mean loss, accuracy)`` of ``model`` on ``(x, y)``; ``(None, None)`` for no rows.

    Up to ``EVAL_BATCH`` rows in one pass, more in batches (a cnn's activations are large).
    """
    n = int(y.shape[0])
    if not n:
        return None, None
    model.eval()
    with torch.inference_mode():
        if n <= EVAL_BATCH:
            logits = model(x)
            loss = float(nn.functional.cross_entropy(logits, y).item())
            return loss, float((logits.argmax(dim=1) == y).float().mean().item())
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, EVAL_BATCH):
            xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum").item())
            correct += int((logits.argmax(dim=1) == yb).sum().item())
    return loss_sum / n, correct / n


def train(job: TrainJob, on_epoch: Callable[[EpochStats], None], stop: threading.Event) -> TrainResult:
    """Train ``job`` to its last epoch; raises ``TrainingStopped`` when ``stop`` is set, ``DataError``
    for data or hyperparameters that cannot be trained on, ``Diverged`` for a non-finite loss."""
    hp = job.hyperparameters
    if job.torch_threads > 0:
        torch.set_num_threads(job.torch_threads)
    device = resolve_device(job.device)
    data, train_idx, val_idx = load_data(job)
    x_train, y_train = data.features[train_idx], data.labels[train_idx]
    x_val, y_val = data.features[val_idx], data.labels[val_idx]
    n, n_val = int(y_train.shape[0]), int(y_val.shape[0])

    model = seeded_model(job.model, x_train.shape[1], len(data.classes), job.seed)
    standardize = model[0]
    assert isinstance(standardize, Standardize)
    standardize.fit(x_train)
    if job.init is not None:
        from swarmtrain.peer.init import apply_init

        apply_init(model, job.init)

    model.to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_val, y_val = x_val.to(device), y_val.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)
    shuffle = torch.Generator().manual_seed(job.seed)

    started = time.perf_counter()
    stats: EpochStats | None = None
    for epoch in range(1, hp.epochs + 1):
        loss, accuracy, seconds = run_epoch(model, optimizer, x_train, y_train, hp.batch_size, shuffle, stop, epoch)
        val_loss, val_accuracy = evaluate(model, x_val, y_val)
        check_finite(epoch, val_loss)
        stats = EpochStats(
            epoch=epoch,
            epochs=hp.epochs,
            loss=loss,
            accuracy=accuracy,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            samples_per_s=n / max(seconds, 1e-9),
            seconds=seconds,
        )
        on_epoch(stats)
    assert stats is not None  # epochs >= 1

    return TrainResult(
        model=model.to("cpu").eval(),
        metadata=metadata_for(job.model, data),
        final=stats,
        train_seconds=time.perf_counter() - started,
        n_train=n,
        n_val=n_val,
    )
