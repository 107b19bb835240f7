"""What a task is on the training side: one module a task (``classification``, ``regression``,
``language_modeling``) behind :class:`TrainingTask`, registered in :data:`TASKS`
(``common.registry``); its static facts are the contract's (``common.tasks``).

A task says how many outputs a model has for it, the loss a batch trains on, what a batch adds to
the epoch's running score and how the score is read at the epoch's end, and how a model is measured
on held-out rows (:class:`Evaluation`: the loss, the score, and the task's further figures). The
training loop (``peer/trainer.py``), fedavg's local learner and the scheduler's re-check
(``training.evaluation``) call these and never name a task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from swarmtrain.common.registry import Registry

EVAL_BATCH = 4096
"""Rows in one evaluation pass; more are measured in batches (a cnn's activations are large)."""


@dataclass(frozen=True)
class Evaluation:
    """A model measured on rows: the task's loss, its score (higher is better), further figures.
    ``loss`` and ``score`` are None for no rows."""

    loss: float | None
    score: float | None
    figures: dict[str, float] = field(default_factory=dict)


class TrainingTask(Protocol):
    """One task's torch halves."""

    name: str

    def outputs(self, classes: int) -> int:
        """The model's outputs (logits per position for a language model) on data of ``classes``."""
        ...

    def head(self) -> list[nn.Module]:
        """Modules after the kind's layers (a regression's ``Rescale``); most tasks: none."""
        ...

    def fit(self, model: nn.Module, targets: torch.Tensor) -> None:
        """Fit the head on the training split's targets (before any training; nothing to fit: no-op)."""
        ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, which the optimizer steps on."""
        ...

    def batch_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """What a batch adds to the epoch's running score (a sum over the batch, on the device)."""
        ...

    def epoch_score(self, total: torch.Tensor, targets: torch.Tensor) -> float:
        """The epoch's running score from the batches' ``total`` and every target of the epoch."""
        ...

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
        """``model`` measured on ``(x, y)``, in eval mode, without gradients."""
        ...

    def throughput(self, samples_per_s: float, x: torch.Tensor) -> dict[str, float]:
        """Figures of the epoch's speed beyond samples/s (a language model's tokens/s)."""
        ...


TASKS: Registry[TrainingTask] = Registry("task")
"""Every task's training halves by its contract name (``common.tasks`` holds its facts)."""


def batches(n: int) -> range:
    return range(0, n, EVAL_BATCH)
