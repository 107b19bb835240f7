"""A session's own validation set: one dataset of every training row then every validation row,
refused when the two differ in columns, classes or target."""

from __future__ import annotations

import pytest
import torch

from swarmtrain.training.data import DataError, Dataset, with_validation


def _dataset(rows: int, classes: list[str], names: list[str] | None = None, target: str = "classification") -> Dataset:
    return Dataset(
        features=torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2),
        labels=torch.arange(rows) % max(len(classes), 1),
        classes=classes,
        feature_names=names or ["a", "b"],
        label_column="label",
        target=target,
    )


def test_every_training_row_trains_and_the_validation_rows_follow() -> None:
    train, val = _dataset(10, ["x", "y"]), _dataset(4, ["x", "y"])
    both, train_idx, val_idx = with_validation(train, val)
    assert train_idx.tolist() == list(range(10)) and val_idx.tolist() == list(range(10, 14))
    assert torch.equal(both.features[val_idx], val.features) and torch.equal(both.labels[train_idx], train.labels)


@pytest.mark.parametrize(
    ("other", "needle"),
    [
        (_dataset(4, ["x", "y"], names=["a", "c"]), "feature columns"),
        (_dataset(4, ["x", "z"]), "classes"),
        (_dataset(4, [], target="regression"), "target"),
    ],
)
def test_a_validation_set_that_differs_is_refused(other: Dataset, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        with_validation(_dataset(10, ["x", "y"]), other)
