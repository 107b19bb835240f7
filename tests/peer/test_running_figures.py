"""An epoch's running figures (``trainer.run_epoch``): each batch's loss and score are kept and
summed every ``FOLD_BATCHES`` batches, the last, partial batch weighted by its rows. With weights
that do not move (a learning rate far below the weights' precision), the running loss is the mean
loss over every row and the running accuracy the accuracy over every row, whatever the folds."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from swarmtrain.common.events import Hyperparameters
from swarmtrain.peer import trainer
from swarmtrain.training.optim import Steps


@pytest.mark.parametrize(("rows", "batch", "fold"), [(100, 16, 2), (96, 16, 3), (100, 16, 256), (5, 16, 1)])
def test_running_loss_and_accuracy_are_the_means_over_every_row(
    rows: int, batch: int, fold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer, "FOLD_BATCHES", fold)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 6, generator=g), torch.randint(0, 3, (rows,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        logits = model(x)
    expected_loss = float(nn.functional.cross_entropy(logits, y))
    expected_accuracy = int((logits.argmax(dim=1) == y).sum()) / rows
    hp = Hyperparameters(epochs=1, batch_size=batch, lr=1e-30, optimizer="sgd", momentum=0.0)
    steps = Steps(hp, model, total=10)
    loss, accuracy, _ = trainer.run_epoch(
        model, steps, x, y, batch, torch.Generator().manual_seed(1), threading.Event(), 1
    )
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == expected_accuracy


def test_a_non_finite_batch_loss_in_any_fold_is_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "FOLD_BATCHES", 2)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    x[37] = float("nan")  # one row of the fourth batch of eight (shuffled: somewhere in the epoch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    steps = Steps(Hyperparameters(epochs=1, batch_size=8, lr=0.01), model, total=8)
    with pytest.raises(trainer.Diverged):
        trainer.run_epoch(model, steps, x, y, 8, torch.Generator().manual_seed(0), threading.Event(), 1)
