"""A search's space is checked once, in the contract: every bad space is refused with its reason."""

from __future__ import annotations

import msgspec
import pytest

from swarmtrain.common.events import Hyperparameters
from swarmtrain.common.models import MlpSpec
from swarmtrain.common.search import SearchSpec, apply, check, grid_size

HP = Hyperparameters(epochs=3, batch_size=32, lr=0.01)
MODEL = MlpSpec()

EXAMPLE = {
    "space": {
        "lr": {"log_uniform": [1e-4, 1e-1]},
        "batch_size": {"choice": [32, 64, 128]},
        "epochs": {"int": [5, 30]},
        "model.hidden.0": {"choice": [64, 128, 256]},
    },
    "trials": 40,
    "sampler": "tpe",
    "pruner": {"name": "asha", "min_epochs": 2, "reduction_factor": 3},
    "metric": "val_accuracy",
    "direction": "maximize",
    "seed": 0,
}


def spec(space: dict[str, object], **extra: object) -> SearchSpec:
    return msgspec.convert({"space": space, "trials": 8, **extra}, SearchSpec)


def test_the_issue_example_decodes_and_is_accepted() -> None:
    s = msgspec.json.decode(msgspec.json.encode(EXAMPLE), type=SearchSpec)
    assert check(s, HP, MODEL) is None
    assert s.resolved() == ("val_accuracy", "maximize")
    assert spec({"lr": {"uniform": [0.1, 0.2]}}, metric="val_loss").resolved() == ("val_loss", "minimize")


def test_a_point_is_applied_to_the_sessions_own_values() -> None:
    hp, model = apply({"lr": 0.5, "epochs": 7, "model.hidden.1": 9}, HP, MODEL)
    assert (hp.lr, hp.epochs, hp.batch_size) == (0.5, 7, 32)
    assert model.hidden == [128, 9] and MODEL.hidden == [128, 64]


@pytest.mark.parametrize(
    ("space", "extra", "reason"),
    [
        ({"lr": {"uniform": [0.1, 0.1]}}, {}, "empty range"),
        ({"lr": {"uniform": [0.2, 0.1]}}, {}, "empty range"),
        ({"epochs": {"int": [9, 3]}}, {}, "empty range"),
        ({"lr": {"log_uniform": [0, 0.1]}}, {}, "positive low"),
        ({"lr": {"log_uniform": [-1, 0.1]}}, {}, "positive low"),
        ({"dropout": {"uniform": [0, 1]}}, {}, "unknown key 'dropout'"),
        ({"momentum": {"uniform": [0, 1]}}, {}, "out of bounds"),
        ({"model.depth": {"int": [1, 3]}}, {}, "unknown key 'model.depth'"),
        ({"model.hidden": {"int": [1, 3]}}, {}, "model.hidden.<index>"),
        ({"model.hidden.5": {"int": [1, 3]}}, {}, "no element 5"),
        ({"model.kind": {"choice": ["cnn"]}}, {}, "unknown key 'model.kind'"),
        ({"epochs": {"uniform": [1, 5]}}, {}, "whole numbers"),
        ({"epochs": {"int": [0, 5]}}, {}, "out of bounds"),
        ({"batch_size": {"choice": [32, -1]}}, {}, "out of bounds"),
        ({"lr": {"uniform": [-0.1, 0.1]}}, {}, "out of bounds"),
        ({"lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}, {}, "exactly one"),
        ({"lr": {}}, {}, "exactly one"),
        ({"batch_size": {"choice": [32, 32]}}, {}, "twice"),
        (
            {"epochs": {"int": [1, 3]}, "batch_size": {"choice": [8, 16, 32]}},
            {"sampler": "grid"},
            "9 points, more than trials (8)",
        ),
        ({"lr": {"uniform": [0.1, 0.2]}}, {"sampler": "grid"}, "lr is continuous"),
    ],
)
def test_a_bad_space_is_refused_with_its_reason(
    space: dict[str, object], extra: dict[str, object], reason: str
) -> None:
    found = check(spec(space, **extra), HP, MODEL)
    assert found is not None and reason in found, found


@pytest.mark.parametrize(
    "body",
    [
        {"space": {}, "trials": 4},
        {"space": {"lr": {"uniform": [0.1, 0.2]}}, "trials": 0},
        {"space": {"lr": {"uniform": [0.1, 0.2]}}, "trials": 4, "sampler": "bayes"},
        {"space": {"lr": {"uniform": [0.1, 0.2]}}, "trials": 4, "pruner": {"name": "hyperband"}},
        {"space": {"lr": {"uniform": [0.1, 0.2]}}, "trials": 4, "pruner": {"name": "asha", "reduction_factor": 1}},
        {"space": {"lr": {"normal": [0.1, 0.2]}}, "trials": 4},
        {"space": {"lr": {"uniform": [0.1]}}, "trials": 4},
        {"space": {"lr": {"uniform": [0.1, 0.2]}}, "trials": 4, "metric": "train_accuracy"},
    ],
)
def test_a_malformed_search_does_not_decode(body: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(body, SearchSpec)


def test_grid_size_counts_every_point() -> None:
    assert grid_size(spec({"epochs": {"int": [1, 3]}, "batch_size": {"choice": [8, 16]}})) == 6
    assert grid_size(spec({"lr": {"uniform": [0.1, 0.2]}})) is None
