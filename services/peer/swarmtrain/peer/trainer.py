"""The training itself: a plain blocking function, meant to run in a worker thread.

Nothing here touches the event loop or the network. Progress goes out through ``on_epoch`` (called
in the worker thread), and a ``threading.Event`` checked before every batch stops it promptly.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch
from torch import nn

from swarmtrain.common import metrics
from swarmtrain.common.events import CLASSIFICATION, DataSpec, Hyperparameters, ModelSpec, Precision
from swarmtrain.peer import checkpoint
from swarmtrain.peer.cache import ParsedCache, tensors_nbytes
from swarmtrain.training import tasks
from swarmtrain.training.data import DataError, Dataset, load, split_indices, with_validation
from swarmtrain.training.init import apply_init, data_shape, initial_model
from swarmtrain.training.model import ModelMetadata
from swarmtrain.training.optim import Steps, steps_per_epoch
from swarmtrain.training.sharding import ShardData, ShardingSpec, read_shard
from swarmtrain.training.tasks import Evaluation, TrainingTask


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


class PrecisionUnsupported(Exception):
    """This peer cannot compute in the precision a session asks for; the message says why (the
    ``PeerFailed`` reason)."""


@dataclass(kw_only=True)
class Amp:
    """Mixed precision for one training: autocast to ``dtype`` on ``device_type`` (none for fp32),
    and for fp16 a gradient scaler (``torch.amp.GradScaler``), kept across epochs.

    Build it with :meth:`for_device`, which refuses what the device cannot do."""

    precision: Precision = "fp32"
    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    @classmethod
    def for_device(cls, precision: Precision, device: torch.device) -> Amp:
        """Raises ``PrecisionUnsupported`` with the reason: fp16 on a CPU, bf16 where autocast to
        it does not work (an old GPU, a CPU build without it)."""
        kind = device.type
        if precision == "fp32":
            return cls(precision="fp32", device_type=kind)
        if kind == "cuda":
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                name = torch.cuda.get_device_name(device)
                raise PrecisionUnsupported(f"bf16 is not supported on {name}: ask for fp16 or fp32")
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
            return cls(precision=precision, device_type="cuda", dtype=dtype, scaler=scaler)
        if precision == "fp16":
            raise PrecisionUnsupported("fp16 needs a CUDA peer: this peer trains on the CPU (ask for bf16 or fp32)")
        if not cpu_bf16_supported():
            raise PrecisionUnsupported("bf16 autocast is not supported by this peer's CPU build of torch")
        return cls(precision="bf16", device_type="cpu", dtype=torch.bfloat16)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The forward pass's context: ``torch.autocast`` to ``dtype``, nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


_cpu_bf16: bool | None = None


def cpu_bf16_supported() -> bool:
    """Whether CPU autocast to bf16 works here: tried once on a tiny layer."""
    global _cpu_bf16
    if _cpu_bf16 is None:
        try:
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                out = nn.Linear(4, 2)(torch.ones(1, 4))
            _cpu_bf16 = out.dtype == torch.bfloat16
        except (RuntimeError, ValueError):
            _cpu_bf16 = False
    return _cpu_bf16


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    csv_path: Path
    """The dataset's file, in ``data.format`` (a CSV unless ``data`` says otherwise)."""
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
    dataset_sha256: str | None = None
    """The dataset's sha256: its parsed tensors are kept under it (``PARSED``). None: taken from the
    file's name when that is a sha256 (the peer names its downloads so, after checking them)."""
    precision: Precision = "fp32"
    data: DataSpec = field(default_factory=DataSpec)
    """How the dataset is read (``Train.data``)."""
    validation_path: Path | None = None
    """The session's own validation set (``Train.validation_url``, same format); None: ``validation_split``."""
    validation_sha256: str | None = None
    resume: bytes | None = None
    """A checkpoint (``peer.checkpoint``) to go on from, after its epoch; None: from epoch 1."""


Checkpointed = Callable[[int, bytes], None]
"""``(epoch, checkpoint bytes)``, called in the worker thread after each ``checkpoint_every``-th
epoch (never the last: the model is the last epoch's state): it stores them."""


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
    precision: Precision = "fp32"
    """What the epoch computed in."""
    figures: dict[str, float] = msgspec.field(default_factory=dict)
    """The task's further validation and speed figures (``common.tasks``; none for classification)."""


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
    """The contract's bounds, for hyperparameters built in process (a decoded ``Train`` has passed them)."""
    try:
        msgspec.convert(msgspec.structs.asdict(hp), Hyperparameters)
    except msgspec.ValidationError as exc:
        raise DataError(f"invalid hyperparameters: {exc}") from None


PARSED_CACHE_BYTES = 2 << 30
"""The parsed datasets a peer process keeps: 2 GiB of tensors, least recently used dropped first."""


def _dataset_bytes(data: Dataset | ShardData) -> int:
    if isinstance(data, ShardData):
        return data.nbytes
    return tensors_nbytes(data.features, data.labels)


PARSED: ParsedCache[Dataset | ShardData] = ParsedCache(PARSED_CACHE_BYTES, _dataset_bytes)
"""Parsed datasets by (sha256, label column, read spec), and fedavg shards by those and the shard
(:func:`shard_key`): only a peer's first session on a dataset (or shard) parses it. Its hits and
misses are in the peer's metrics. The tensors are shared: never changed in place (the trainer
indexes them, which copies)."""

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def dataset_key(job: TrainJob) -> str | None:
    """The cache key of the job's parsed dataset: its sha256, label column and ``DataSpec``, hashed
    (the same file read with another label column is another dataset); None: not cached."""
    sha256 = job.dataset_sha256 or (job.csv_path.stem if _SHA256.match(job.csv_path.stem) else None)
    if sha256 is None or not _SHA256.match(sha256):
        return None
    spec = "" if job.data == DataSpec() else f"\x00{msgspec.json.encode(job.data).decode()}"
    return hashlib.sha256(f"{sha256.lower()}\x00{job.label_column}{spec}".encode()).hexdigest()


def parse(job: TrainJob) -> Dataset:
    """The job's dataset as tensors: from ``PARSED`` when this process parsed it before."""
    data = _cached(dataset_key(job), lambda: load(job.csv_path, job.data, job.label_column))
    assert isinstance(data, Dataset)
    return data


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """Which shard of a job's dataset a fedavg peer reads (``Train``'s shard, num_shards, round
    options' sharding): with the job's seed and validation split, it fixes the rows."""

    shard: int
    num_shards: int
    sharding: ShardingSpec = field(default_factory=ShardingSpec)


def shard_key(job: TrainJob, which: ShardJob) -> str | None:
    """The cache key of a shard: the dataset's key (content, label column, read spec) and every
    input of the shard's rows and statistics; None: not cached."""
    key = dataset_key(job)
    if key is None:
        return None
    cut = msgspec.json.encode(
        [job.seed, job.validation_split, which.num_shards, which.shard, which.sharding, "stats-v1"]
    ).decode()
    return hashlib.sha256(f"{key}\x00shard\x00{cut}".encode()).hexdigest()


def parse_shard(job: TrainJob, which: ShardJob) -> ShardData:
    """The job's shard, validation rows and training statistics (``sharding.read_shard``): from
    ``PARSED`` when this process read that shard of that dataset before."""
    _check(job.hyperparameters)

    def read() -> ShardData:
        return read_shard(
            job.csv_path,
            job.data,
            job.label_column,
            validation_split=job.validation_split,
            seed=job.seed,
            sharding=which.sharding,
            num_shards=which.num_shards,
            shard=which.shard,
        )

    data = _cached(shard_key(job, which), read)
    assert isinstance(data, ShardData)
    if len(data.classes) < 2 and job.data.format != "text":  # a corpus has next tokens, not classes
        raise DataError(f"the label column has {len(data.classes)} class; at least 2 are needed")
    return data


def _cached(key: str | None, read: Callable[[], Dataset | ShardData]) -> Dataset | ShardData:
    if key is None:
        return read()
    parsed = False

    def load_once() -> Dataset | ShardData:
        nonlocal parsed
        parsed = True
        return read()

    data = PARSED.get_or_load(key, load_once)
    metrics.parse_cache(hit=not parsed)
    return data


def load_data(job: TrainJob) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """The job's dataset and its (train, validation) row indexes; a DataError if it cannot be trained on."""
    _check(job.hyperparameters)
    data = parse(job)
    if data.target != job.data.task:
        raise DataError(f"the dataset's target is {data.target}, the session's task {job.data.task}")
    if data.target == "classification" and len(data.classes) < 2:
        raise DataError(f"the label column has {len(data.classes)} class; at least 2 are needed")
    if job.validation_path is not None:
        held_out = TrainJob(
            csv_path=job.validation_path,
            label_column=job.label_column,
            model=job.model,
            hyperparameters=job.hyperparameters,
            dataset_sha256=job.validation_sha256,
            data=job.data,
        )
        return with_validation(data, parse(held_out))
    train_idx, val_idx = split_indices(len(data), job.validation_split, job.seed)
    return data, train_idx, val_idx


def metadata_for(spec: ModelSpec, data: Dataset) -> ModelMetadata:
    return ModelMetadata.for_spec(
        spec,
        classes=data.classes,
        feature_names=data.feature_names,
        label_column=data.label_column,
        shape=data_shape(data),
    )


def epoch_figures(
    learns: TrainingTask, measured: Evaluation, samples_per_s: float, x: torch.Tensor
) -> dict[str, float]:
    """What an epoch's report carries besides loss and score: the task's validation figures and speed."""
    return {**measured.figures, **learns.throughput(samples_per_s, x)}


FOLD_BATCHES = 256
"""Batches whose losses and scores an epoch keeps before it sums them (bounded memory)."""


def run_epoch(
    model: nn.Module,
    steps: Steps,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: torch.Generator,
    stop: threading.Event,
    epoch: int,
    amp: Amp | None = None,
    learns: TrainingTask | None = None,
) -> tuple[float, float, float]:
    """One pass over ``(x, y)`` in a shuffled order: ``(mean loss, accuracy, seconds)``, both running.

    ``steps``: the run's optimizer steps (``training/optim.py``), flushed at the epoch's end.
    ``amp``: the forward pass autocast; None: fp32. ``learns``: the task (its loss and running
    score; None: classification). Raises
    ``TrainingStopped`` before any batch once ``stop`` is set, ``Diverged`` when the epoch's loss is
    not finite.
    """
    amp = amp or Amp()
    learns = learns or tasks.task(CLASSIFICATION)
    device = x.device
    n = int(y.shape[0])
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=shuffle).to(device)
    xs, ys = x[perm], y[perm]
    # The running figures cost no kernel per batch beyond the task's score: each batch's loss and
    # score are kept as they are and summed every FOLD_BATCHES batches (bench/p1_training.py).
    loss_sum = torch.zeros((), device=device)
    score: torch.Tensor | None = None
    losses: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    for start in range(0, n, batch_size):
        if stop.is_set():
            raise TrainingStopped(f"stopped in epoch {epoch}")
        xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
        with amp.autocast():
            outputs = model(xb)
            loss = learns.loss(outputs, yb)
        steps.backward(loss)
        losses.append(loss.detach())
        scores.append(learns.batch_score(outputs, yb))
        if len(losses) == FOLD_BATCHES or start + batch_size >= n:
            if yb.shape[0] != batch_size:  # the epoch's last batch, partial: weighted by its rows
                losses[-1] = losses[-1].float() * (yb.shape[0] / batch_size)
            loss_sum = loss_sum + torch.stack(losses).float().sum() * batch_size
            part = torch.stack(scores).sum(dim=0)
            score = part if score is None else score + part
            losses, scores = [], []
    steps.flush()
    assert score is not None  # n >= 1
    train_loss, train_score = loss_sum.item() / n, learns.epoch_score(score, ys)  # syncs the device
    check_finite(epoch, train_loss)
    return train_loss, train_score, time.perf_counter() - t0


def train(
    job: TrainJob,
    on_epoch: Callable[[EpochStats], None],
    stop: threading.Event,
    on_checkpoint: Checkpointed | None = None,
) -> TrainResult:
    """Train ``job`` to its last epoch (from the epoch after ``job.resume``'s, if any); raises
    ``TrainingStopped`` when ``stop`` is set, ``DataError`` for data or hyperparameters that cannot
    be trained on, ``Diverged`` for a non-finite loss, ``CheckpointError`` for a checkpoint that
    does not fit the run. ``on_checkpoint``: where the ``checkpoint_every``-th epochs' state goes."""
    hp = job.hyperparameters
    if job.torch_threads > 0:
        torch.set_num_threads(job.torch_threads)
    device = resolve_device(job.device)
    amp = Amp.for_device(job.precision, device)
    data, train_idx, val_idx = load_data(job)
    x_train, y_train = data.features[train_idx], data.labels[train_idx]
    x_val, y_val = data.features[val_idx], data.labels[val_idx]
    n, n_val = int(y_train.shape[0]), int(y_val.shape[0])

    learns = tasks.task(data.target)
    model = initial_model(job.model, data, train_idx, job.seed)
    if job.init is not None:
        apply_init(model, job.init)

    model.to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_val, y_val = x_val.to(device), y_val.to(device)
    per_epoch = steps_per_epoch(n, hp)
    steps = Steps(hp, model, total=hp.epochs * per_epoch, scaler=amp.scaler)
    shuffle = torch.Generator().manual_seed(job.seed)
    first = 1
    if job.resume is not None:
        first = checkpoint.restore(job.resume, model, steps, shuffle, per_epoch, device) + 1

    started = time.perf_counter()
    stats: EpochStats | None = None
    for epoch in range(first, hp.epochs + 1):
        loss, accuracy, seconds = run_epoch(
            model, steps, x_train, y_train, hp.batch_size, shuffle, stop, epoch, amp, learns
        )
        measured = learns.evaluate(model, x_val, y_val)
        val_loss, val_accuracy = measured.loss, measured.score
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
            precision=amp.precision,
            figures=epoch_figures(learns, measured, n / max(seconds, 1e-9), x_train),
        )
        on_epoch(stats)
        every = hp.checkpoint_every
        if on_checkpoint is not None and every > 0 and epoch % every == 0 and epoch < hp.epochs:
            on_checkpoint(epoch, checkpoint.dumps(model, steps, shuffle, epoch, device))
    assert stats is not None  # epochs >= 1, a checkpoint's epoch < epochs

    return TrainResult(
        model=model.to("cpu").eval(),
        metadata=metadata_for(job.model, data),
        final=stats,
        train_seconds=time.perf_counter() - started,
        n_train=n,
        n_val=n_val,
    )
