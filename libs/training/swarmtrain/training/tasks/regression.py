"""``regression``: one output, MSE loss; the score is R² (higher is better, and on one validation
set it orders models exactly as their MSE does), with MAE, RMSE and R² reported.

The targets are float32 values in the label's own units; the model ends in ``training.model``'s
``Rescale`` (the training split's target mean and std), so it starts near predicting the mean and
its outputs are in the label's units."""

from __future__ import annotations

import math

import torch
from torch import nn

from swarmtrain.common.tasks import LOWEST
from swarmtrain.training.tasks.base import EVAL_BATCH, TASKS, Evaluation, batches


def _flat(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.reshape(outputs.shape[0]).float()


def r_squared(sse: float, targets: torch.Tensor) -> float:
    """``1 - SSE / SST``: 0 for a model that predicts the mean; 0 as well where the targets are constant."""
    sst = float(((targets.double() - targets.double().mean()) ** 2).sum().item())
    if sst <= 0.0:
        return 0.0
    return max(1.0 - sse / sst, LOWEST)


MIN_STD = 1e-6


class Rescale(nn.Module):
    """``out * std + mean`` with the training split's target statistics kept as buffers: the kind's
    one output in standard units becomes the label's units (so a fresh model predicts about the
    mean, whatever the target's scale)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("std", torch.ones(1))

    @torch.no_grad()
    def fit(self, targets: torch.Tensor) -> None:
        std = targets.float().std(correction=0)
        self.mean.fill_(float(targets.float().mean()))
        self.std.fill_(float(std) if float(std) >= MIN_STD else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


class Regression:
    name = "regression"

    def outputs(self, classes: int) -> int:
        return 1

    def head(self) -> list[nn.Module]:
        return [Rescale()]

    def fit(self, model: nn.Module, targets: torch.Tensor) -> None:
        for module in model.modules():
            if isinstance(module, Rescale):
                module.fit(targets)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(_flat(outputs), targets)

    def batch_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((_flat(outputs.detach()) - targets) ** 2).sum(dtype=torch.float64)

    def epoch_score(self, total: torch.Tensor, targets: torch.Tensor) -> float:
        return r_squared(float(total.item()), targets)

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
        n = int(y.shape[0])
        if not n:
            return Evaluation(None, None)
        model.eval()
        sse = sae = 0.0
        with torch.inference_mode():
            for start in batches(n):
                stop = start + EVAL_BATCH
                error = _flat(model(x[start:stop])).double() - y[start:stop].double()
                sse += float((error**2).sum().item())
                sae += float(error.abs().sum().item())
        mse = sse / n
        r2 = r_squared(sse, y)
        return Evaluation(mse, r2, {"mae": sae / n, "rmse": math.sqrt(mse), "r2": r2})

    def throughput(self, samples_per_s: float, x: torch.Tensor) -> dict[str, float]:
        return {}


TASKS.add("regression", Regression())
