"""A regression trains on the peer's loop: the diabetes table (Parquet, a float target) ends with a
validation MSE below predicting the training mean, R² above 0, MAE/RMSE reported every epoch, and
its model file says it is a regression and predicts in the target's units."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from swarmtrain.common.events import DataSpec, Hyperparameters
from swarmtrain.common.models import MlpSpec
from swarmtrain.peer.trainer import EpochStats, TrainJob, train
from swarmtrain.training.data import DataError, load, split_indices
from swarmtrain.training.model import load_model, model_bytes
from tests.training.formatdata import diabetes_parquet, table_parquet

SPEC = DataSpec(format="parquet", task="regression")


def _job(path: Path, data: DataSpec = SPEC, epochs: int = 30) -> TrainJob:
    return TrainJob(
        csv_path=path,
        label_column="progression",
        data=data,
        model=MlpSpec(hidden=[32]),
        hyperparameters=Hyperparameters(epochs=epochs, batch_size=32, lr=0.01),
        validation_split=0.2,
        seed=3,
    )


def test_a_regression_beats_predicting_the_mean(tmp_path: Path) -> None:
    path = tmp_path / "diabetes.parquet"
    path.write_bytes(diabetes_parquet())
    seen: list[EpochStats] = []
    result = train(_job(path), seen.append, threading.Event())
    dataset = load(path, SPEC, "progression")
    train_idx, val_idx = split_indices(len(dataset), 0.2, 3)
    y_val = dataset.labels[val_idx]
    mean_mse = float(((y_val - dataset.labels[train_idx].mean()) ** 2).mean())
    final = result.final
    assert final.val_loss is not None and final.val_accuracy is not None
    assert final.val_loss < 0.75 * mean_mse, (final.val_loss, mean_mse)  # well below the mean's MSE
    assert 0.25 < final.val_accuracy <= 1.0  # R²
    assert set(final.figures) == {"mae", "rmse", "r2"}
    assert final.figures["rmse"] == pytest.approx(final.val_loss**0.5)
    assert final.figures["r2"] == final.val_accuracy
    assert len(seen) == 30 and seen[0].val_loss is not None and seen[0].val_loss > final.val_loss

    model, metadata = load_model(model_bytes(result.model, result.metadata))
    assert metadata.task == "regression" and metadata.classes == []
    with torch.no_grad():
        predicted = model(dataset.features[val_idx]).reshape(-1)
    assert float(((predicted - y_val) ** 2).mean()) == pytest.approx(final.val_loss, rel=1e-4)


def test_a_task_other_than_the_datasets_target_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    path.write_bytes(table_parquet(rows=60))
    job = TrainJob(
        csv_path=path,
        label_column="label",
        data=SPEC,
        model=MlpSpec(hidden=[8]),
        hyperparameters=Hyperparameters(epochs=1, batch_size=32, lr=0.01),
    )
    with pytest.raises(DataError, match="target is classification, the session's task regression"):
        train(job, lambda _: None, threading.Event())
