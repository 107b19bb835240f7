"""``classification``: cross-entropy over the classes' logits; the score is accuracy. Exactly the
loss and figures every session had before tasks (the same operations in the same order, so old
sessions replay bit for bit)."""

from __future__ import annotations

import torch
from torch import nn

from swarmtrain.training.tasks.base import EVAL_BATCH, TASKS, Evaluation


class Classification:
    name = "classification"

    def outputs(self, classes: int) -> int:
        return classes

    def head(self) -> list[nn.Module]:
        return []

    def fit(self, model: nn.Module, targets: torch.Tensor) -> None:
        return None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def batch_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.detach().argmax(dim=1) == targets).sum()

    def epoch_score(self, total: torch.Tensor, targets: torch.Tensor) -> float:
        return int(total.item()) / int(targets.shape[0])

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
        loss, accuracy = evaluate_classes(model, x, y)
        return Evaluation(loss, accuracy)

    def throughput(self, samples_per_s: float, x: torch.Tensor) -> dict[str, float]:
        return {}


def evaluate_classes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, float | None]:
    """``(mean loss, accuracy)`` of ``model`` on ``(x, y)``; ``(None, None)`` for no rows.

    Up to ``EVAL_BATCH`` rows in one pass, more in batches."""
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


TASKS.add("classification", Classification())
