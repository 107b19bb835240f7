"""A model measured on a session's validation split: :func:`evaluate` (what a peer reports each
epoch) and :func:`measure`, the scheduler's own figure of a finished model (issue 10: figures are
checked, not believed).

Blocking (torch): the scheduler runs ``measure`` in a worker thread. It is the peers' own code, so
the figure is the one a peer computes for ``val_accuracy``: the model file loaded as the peer
loads it (``model.load_model``: safetensors, never unpickled), the dataset parsed as the peer
parses it (``data.load`` with its format's reader, :func:`load_dataset`), the same seeded validation split
(``data.split_indices`` with the session's ``validation_split`` and ``seed``), and :func:`evaluate`.

What is wrong with the MODEL (missing, other bytes than its ``PeerDone`` named, too large, not a
model file, not fitting the dataset's columns or classes) is an answer: ``Measured`` with no
accuracy and the reason, and such a model never wins. What is wrong around it (the dataset cannot
be read now) raises, and the shell tries again later.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swarmtrain.common import blob, formats
from swarmtrain.common.events import SessionRequested
from swarmtrain.training import tasks
from swarmtrain.training.data import Dataset, load, split_indices, with_validation
from swarmtrain.training.model import load_model
from swarmtrain.training.sharding import make_shards
from swarmtrain.training.tasks.base import EVAL_BATCH
from swarmtrain.training.tasks.classification import evaluate_classes

__all__ = ["EVAL_BATCH", "Measured", "evaluate", "load_dataset", "measure", "shard_histograms"]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, float | None]:
    """``(mean loss, accuracy)`` of a classifier on ``(x, y)``; ``(None, None)`` for no rows
    (``tasks.classification``; every task's measure: ``tasks.task(name).evaluate``)."""
    return evaluate_classes(model, x, y)


@dataclass(frozen=True)
class Measured:
    val_loss: float | None
    val_accuracy: float | None
    reason: str | None = None
    """Why the model could not be evaluated; None when it was."""


def measure(
    store: blob.BlobStore, request: SessionRequested, model_uri: str, model_sha256: str, max_model_bytes: int
) -> Measured:
    """Evaluate the model at ``model_uri`` (which must hash to ``model_sha256``) on ``request``'s
    validation split."""
    try:
        raw = store.get_bytes(store.key_of(model_uri), max_bytes=max_model_bytes)
    except blob.BlobNotFound:
        return Measured(None, None, "no model file at its model_uri")
    except blob.TooLarge:
        return Measured(None, None, f"the model file is larger than {max_model_bytes} bytes")
    except ValueError as exc:  # outside the store
        return Measured(None, None, f"its model_uri is not in the store: {exc}")
    if hashlib.sha256(raw).hexdigest() != model_sha256:
        return Measured(None, None, "the model file's sha256 differs from the one its PeerDone named")
    try:
        model, metadata = load_model(raw)
    except Exception as exc:  # anything a hostile file can make the loader raise
        return Measured(None, None, f"the model file does not load: {type(exc).__name__}: {str(exc)[:300]}")

    dataset = load_dataset(store, request)  # raises: not the model's fault, tried again later
    if metadata.feature_names != dataset.feature_names or metadata.classes != dataset.classes:
        return Measured(None, None, "the model's feature columns or classes differ from the dataset's")
    if metadata.task != dataset.target:
        return Measured(None, None, f"the model is a {metadata.task} model, the dataset's target {dataset.target}")
    if request.validation is not None:  # the session's own validation set
        held_out = load_dataset(store, request, validation=True)
        dataset, _, val_idx = with_validation(dataset, held_out)
    else:
        _, val_idx = split_indices(len(dataset), request.validation_split, request.seed)
    try:
        measured = tasks.task(dataset.target).evaluate(model, dataset.features[val_idx], dataset.labels[val_idx])
        val_loss, val_accuracy = measured.loss, measured.score
    except Exception as exc:  # shapes a forged file can get wrong despite its metadata
        return Measured(None, None, f"the model does not evaluate: {type(exc).__name__}: {str(exc)[:300]}")
    if val_accuracy is None:
        return Measured(None, None, "the validation split is empty")
    finite_loss = val_loss if val_loss is not None and math.isfinite(val_loss) else None
    return Measured(finite_loss, val_accuracy)


def shard_histograms(store: blob.BlobStore, request: SessionRequested) -> list[list[int]]:
    """Per shard of ``request``'s training rows, its rows per class index, cut as the peers cut
    them (``sharding.make_shards`` on the same split and seed). Raises ``DataError`` when the
    dataset cannot be sharded so (the session fails), anything else when it cannot be read now."""
    dataset = load_dataset(store, request)
    if request.validation is not None:
        train_idx = torch.arange(len(dataset))
    else:
        train_idx, _ = split_indices(len(dataset), request.validation_split, request.seed)
    sharding = make_shards(request.round_options.sharding, train_idx, dataset.labels, request.num_peers, request.seed)
    return sharding.histograms


CACHED_DATASETS = 2
"""Parsed datasets kept for the next evaluation (a sweep's winner, the next session on the same
data): the end of a session then waits on no download and no parse."""
CACHED_DATASET_BYTES = 32 << 20
"""Only datasets whose file is at most this large are kept."""
_cache: OrderedDict[tuple[str, str, str, str], Dataset] = OrderedDict()
_cache_lock = threading.Lock()


def load_dataset(store: blob.BlobStore, request: SessionRequested, validation: bool = False) -> Dataset:
    """``request``'s dataset (``validation``: its own validation set) from ``store`` (checked against
    its sha256), parsed as a peer parses it; kept (``CACHED_DATASETS``) when small. The key holds
    the sha256 the download is checked against, so a cached copy is the same bytes."""
    uri, sha256 = request.dataset_uri, request.dataset_sha256
    if validation and request.validation is not None:
        uri, sha256 = request.validation.uri, request.validation.sha256
    key = (uri, sha256, request.label_column, repr(request.data))
    with _cache_lock:
        if (hit := _cache.get(key)) is not None:
            _cache.move_to_end(key)
            return hit
    with tempfile.TemporaryDirectory(prefix="swarmtrain-eval-") as tmp:
        path = Path(tmp) / f"data.{formats.rules(request.data.format).extension}"
        store.download(store.key_of(uri), path, sha256=sha256)
        dataset = load(path, request.data, request.label_column)
        small = path.stat().st_size <= CACHED_DATASET_BYTES
    if small:
        with _cache_lock:
            _cache[key] = dataset
            while len(_cache) > CACHED_DATASETS:
                _cache.popitem(last=False)
    return dataset
