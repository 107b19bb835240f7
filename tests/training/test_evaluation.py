"""The scheduler's own measure of a finished model (``evaluation.measure``) on a real file store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from swarmtrain.common import blob
from swarmtrain.common.events import DataSpec
from swarmtrain.common.models import MlpSpec
from swarmtrain.training import evaluation
from swarmtrain.training.data import load
from swarmtrain.training.model import ModelMetadata, build_model, model_bytes
from tests.factories import session_requested

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.csv"


def stored(tmp_path: Path) -> tuple[blob.FileStore, blob.BlobRef, str, str]:
    store = blob.FileStore(tmp_path / "blobs")
    dataset = store.put_bytes("datasets/digits.csv", DIGITS.read_bytes())
    data = load(DIGITS, DataSpec(), "label")
    spec = MlpSpec(hidden=[16])
    meta = ModelMetadata.for_spec(
        spec, classes=list(data.classes), feature_names=list(data.feature_names), label_column="label"
    )
    raw = model_bytes(build_model(spec, data.features.shape[1], len(data.classes)), meta)
    model = store.put_bytes("sessions/s1/models/a.safetensors", raw)
    return store, dataset, model.uri, hashlib.sha256(raw).hexdigest()


def test_a_dataset_measured_once_is_not_downloaded_again_and_a_changed_one_is(tmp_path: Path) -> None:
    evaluation._cache.clear()
    store, dataset, model_uri, sha = stored(tmp_path)
    request = session_requested(dataset_uri=dataset.uri, dataset_sha256=dataset.sha256, model=MlpSpec(hidden=[16]))
    first = evaluation.measure(store, request, model_uri, sha, 1 << 30)
    assert first.reason is None and first.val_accuracy is not None
    store.delete("datasets/digits.csv")  # the next evaluation of this dataset reads no file
    assert evaluation.measure(store, request, model_uri, sha, 1 << 30) == first
    # another sha256 is another dataset: not served from the cache
    other = session_requested(dataset_uri=dataset.uri, dataset_sha256="f" * 64, model=MlpSpec(hidden=[16]))
    with pytest.raises(blob.BlobNotFound):
        evaluation.measure(store, other, model_uri, sha, 1 << 30)
    evaluation._cache.clear()
