"""Data loading, splitting, the model, its safetensors file and the trainer: plain function calls."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from swarmtrain.common.events import DataSpec, Hyperparameters
from swarmtrain.common.models import MlpSpec
from swarmtrain.peer.trainer import EpochStats, TrainingStopped, TrainJob, resolve_device, train
from swarmtrain.training.data import DataError, load, split_indices
from swarmtrain.training.model import ModelMetadata, Standardize, build_model, load_model, save_model

# ------------------------------------------------------------------ data


def test_load_csv_features_labels_and_sorted_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,kind,b\n1,cat,2.5\n3, dog ,4\n\n5,bird,-1e2\n")
    ds = load(path, DataSpec(), "kind")
    assert ds.feature_names == ["a", "b"]
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.features.dtype == torch.float32
    assert ds.labels.dtype == torch.int64
    assert ds.features.tolist() == [[1.0, 2.5], [3.0, 4.0], [5.0, -100.0]]
    assert ds.labels.tolist() == [1, 2, 0]
    assert len(ds) == 3


def test_load_digits(digits_path: Path) -> None:
    ds = load(digits_path, DataSpec(), "digit")
    assert ds.features.shape == (1797, 64)
    assert ds.classes == [str(i) for i in range(10)]


@pytest.mark.parametrize(
    ("text", "label", "message"),
    [
        ("", "label", "empty"),
        ("a,b\n1,2\n", "label", "no label column 'label'"),
        ("a,label\n1,x\nfoo,y\n", "label", "column 'a' is not numeric"),
        ("a,label\n1,x\n2\n", "label", "line 3"),
        ("a,label\n", "label", "no data rows"),
        ("a,label\ninf,x\n", "label", "finite"),
        ("label\nx\n", "label", "no feature columns"),
    ],
)
def test_load_csv_rejects(tmp_path: Path, text: str, label: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load(path, DataSpec(), label)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train_a, val_a = split_indices(100, 0.2, seed=7)
    train_b, val_b = split_indices(100, 0.2, seed=7)
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b)
    assert len(val_a) == 20 and len(train_a) == 80
    assert sorted(torch.cat([train_a, val_a]).tolist()) == list(range(100))
    _, val_c = split_indices(100, 0.2, seed=8)
    assert not torch.equal(val_a, val_c)


@pytest.mark.parametrize(
    ("n", "fraction", "n_val"), [(10, 0.01, 1), (2, 0.5, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0), (9, 0.5, 4)]
)
def test_split_sizes(n: int, fraction: float, n_val: int) -> None:
    train_idx, val_idx = split_indices(n, fraction, seed=0)
    assert len(val_idx) == n_val
    assert len(train_idx) == n - n_val


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError):
        split_indices(10, fraction, seed=0)


# ------------------------------------------------------------------ model


def test_model_shapes_and_layers() -> None:
    model = build_model(MlpSpec(hidden=[32, 16]), n_features=8, n_classes=3)
    assert isinstance(model[0], Standardize)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 32), (32, 16), (16, 3)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model) == 2
    assert model(torch.randn(5, 8)).shape == (5, 3)
    assert build_model(MlpSpec(hidden=[]), 4, 2)(torch.randn(2, 4)).shape == (2, 2)


def test_standardize_uses_one_for_constant_features() -> None:
    layer = Standardize(3)
    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0000001]])
    layer.fit(x)
    assert layer.mean.tolist() == pytest.approx([2.0, 5.0, 2.0])
    assert layer.std.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert layer(x)[:, 1].tolist() == [0.0, 0.0]


def test_safetensors_round_trip_without_pickle(tmp_path: Path) -> None:
    model = build_model(MlpSpec(hidden=[16]), n_features=4, n_classes=3)
    standardize = model[0]
    assert isinstance(standardize, Standardize)
    standardize.fit(torch.randn(20, 4) * 3 + 1)
    meta = ModelMetadata(
        classes=["a", "b", "c"], feature_names=list("wxyz"), label_column="y", model=MlpSpec(hidden=[16])
    )
    path = tmp_path / "m.safetensors"
    save_model(model, path, meta)

    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: tensors + string map
        header = f.metadata()
        names = set(f.keys())
    assert json.loads(header["classes"]) == ["a", "b", "c"]
    assert json.loads(header["feature_names"]) == ["w", "x", "y", "z"]
    assert header["label_column"] == "y"
    assert {"0.mean", "0.std", "1.weight", "3.bias"} <= names

    x = torch.randn(6, 4)
    expected = model.eval()(x)
    for source in (path, path.read_bytes()):
        loaded, loaded_meta = load_model(source)
        assert loaded_meta == meta
        assert torch.allclose(loaded(x), expected)


def test_load_model_rejects_foreign_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a swarmtrain model"):
        load_model(path)


# ------------------------------------------------------------------ trainer


def _job(path: Path, epochs: int = 5, batch_size: int = 32, seed: int = 0) -> TrainJob:
    return TrainJob(
        csv_path=path,
        label_column="digit",
        model=MlpSpec(hidden=[64, 32]),
        hyperparameters=Hyperparameters(epochs=epochs, batch_size=batch_size, lr=1e-3),
        validation_split=0.2,
        seed=seed,
        device="cpu",
        torch_threads=1,
    )


def test_trainer_learns_digits(digits_path: Path) -> None:
    seen: list[EpochStats] = []
    result = train(_job(digits_path), seen.append, threading.Event())
    assert [s.epoch for s in seen] == [1, 2, 3, 4, 5]
    assert all(s.epochs == 5 and s.samples_per_s > 0 for s in seen)
    assert seen[-1].loss < seen[0].loss
    assert result.final == seen[-1]
    assert result.final.val_accuracy is not None and result.final.val_accuracy > 0.85  # chance: 0.1
    assert result.n_val == round(1797 * 0.2) and result.n_train == 1797 - result.n_val
    assert result.metadata.classes == [str(i) for i in range(10)]
    assert next(result.model.parameters()).device.type == "cpu"
    assert not result.model.training


def test_trainer_is_deterministic(digits_path: Path) -> None:
    a = train(_job(digits_path, epochs=2), lambda s: None, threading.Event())
    b = train(_job(digits_path, epochs=2), lambda s: None, threading.Event())
    assert a.final.loss == b.final.loss and a.final.val_accuracy == b.final.val_accuracy
    for (name, ta), (_, tb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(ta, tb), name


def test_trainer_stops_within_a_batch(digits_path: Path) -> None:
    stop = threading.Event()
    seen: list[EpochStats] = []

    def on_epoch(stats: EpochStats) -> None:
        seen.append(stats)
        stop.set()  # the next epoch must end at its first batch

    with pytest.raises(TrainingStopped):
        train(_job(digits_path, epochs=1000), on_epoch, stop)
    assert len(seen) == 1

    already = threading.Event()
    already.set()
    with pytest.raises(TrainingStopped):
        train(_job(digits_path), lambda s: pytest.fail("no epoch may finish"), already)


def test_trainer_stops_promptly_from_another_thread(digits_path: Path) -> None:
    stop = threading.Event()
    first_epoch = threading.Event()
    epochs: list[int] = []
    outcome: list[BaseException] = []

    def on_epoch(stats: EpochStats) -> None:
        epochs.append(stats.epoch)
        first_epoch.set()

    def work() -> None:
        try:
            train(_job(digits_path, epochs=100_000, batch_size=8), on_epoch, stop)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    assert first_epoch.wait(30)
    stop.set()
    at_stop = len(epochs)
    worker.join(10)
    assert not worker.is_alive()
    # it stops at its next batch: no epoch after the one under way when stop was set is reported
    assert len(epochs) <= at_stop + 1
    assert len(outcome) == 1 and isinstance(outcome[0], TrainingStopped)


def test_trainer_rejects_bad_inputs(tmp_path: Path, digits_path: Path) -> None:
    one_class = tmp_path / "one.csv"
    one_class.write_text("a,digit\n1,x\n2,x\n3,x\n")
    with pytest.raises(DataError, match="at least 2"):
        train(_job(one_class), lambda s: None, threading.Event())
    bad = TrainJob(
        csv_path=digits_path,
        label_column="digit",
        model=MlpSpec(),
        hyperparameters=Hyperparameters(epochs=1, batch_size=0, lr=1e-3),
    )
    with pytest.raises(DataError, match="hyperparameters"):
        train(bad, lambda s: None, threading.Event())


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
