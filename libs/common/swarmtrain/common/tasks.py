"""Each task's static facts, stated once in the contract and read by everyone (no torch).

A task (``events.Task``) is what a session learns; the dataset decides it (``DatasetUploaded.target``:
a categorical label is ``classification``, a numeric one ``regression``, a corpus
``language_modeling``), and it travels in ``DataSpec.task``. Every report carries two figures in the
same places whatever the task: ``loss`` / ``val_loss`` (the task's loss: cross-entropy, MSE,
next-token cross-entropy) and ``accuracy`` / ``val_accuracy``, the task's **score**, where higher is
always better (accuracy; R² for a regression, which on one validation set orders models exactly as
their MSE does; next-token accuracy for a language model). So the scheduler's check of a sweep's
winner and the leaderboard's order are the same code for every task; what differs is said here:
the score's name and bounds, the headline a person reads (accuracy, MSE, perplexity) and the
task's further figures (``Heartbeat.figures``). The torch halves (loss, batches, evaluation) are
``swarmtrain/training/tasks/<name>.py``, registered in ``training.tasks.TASKS``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import get_args

from swarmtrain.common.events import Task
from swarmtrain.common.registry import Registry

LOWEST: float = -sys.float_info.max


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRules:
    description: str
    """One line for a person."""
    loss: str
    """The loss's name (what ``loss``/``val_loss`` hold)."""
    score: str
    """The score's name (what ``accuracy``/``val_accuracy`` hold; higher is better)."""
    score_low: float
    score_high: float
    """The bounds a reported score must lie in (the scheduler refuses others)."""
    headline: str
    """The figure a person ranks by: ``val_accuracy``, ``mse`` (= ``val_loss``), ``perplexity``."""
    headline_higher_is_better: bool
    figures: tuple[str, ...] = ()
    """The names ``Heartbeat.figures`` carries for this task."""
    one_output: bool = False
    """The model has one output (a regression), not one per class."""

    def outputs(self, classes: int) -> int:
        """The model's outputs on a dataset of ``classes`` classes (what its size is counted on)."""
        return 1 if self.one_output else classes

    def headline_of(self, val_loss: float | None, val_accuracy: float | None) -> float | None:
        """The headline figure from a report's two figures."""
        if self.headline == "accuracy":
            return val_accuracy
        if val_loss is None:
            return None
        if self.headline == "perplexity":
            return math.exp(min(val_loss, 700.0))
        return val_loss


RULES: Registry[TaskRules] = Registry("task")
RULES.add(
    "classification",
    TaskRules(
        description="predict a class: cross-entropy loss, accuracy",
        loss="cross_entropy",
        score="accuracy",
        score_low=0.0,
        score_high=1.0,
        headline="accuracy",
        headline_higher_is_better=True,
    ),
)
RULES.add(
    "regression",
    TaskRules(
        description="predict a number: MSE loss; MAE, RMSE and R² reported (the score is R²)",
        loss="mse",
        score="r2",
        score_low=LOWEST,
        score_high=1.0,
        headline="mse",
        headline_higher_is_better=False,
        figures=("mae", "rmse", "r2"),
        one_output=True,
    ),
)
RULES.add(
    "language_modeling",
    TaskRules(
        description="predict the next token: cross-entropy over context windows; perplexity and tokens/s",
        loss="cross_entropy",
        score="token_accuracy",
        score_low=0.0,
        score_high=1.0,
        headline="perplexity",
        headline_higher_is_better=False,
        figures=("perplexity", "tokens_per_s"),
    ),
)
RULES.check_names(get_args(Task))
TASKS: tuple[str, ...] = get_args(Task)


def rules(task: str) -> TaskRules:
    """``task``'s facts; ``UnknownName`` for a name the contract does not have."""
    return RULES.get(task)


def as_json() -> dict[str, dict[str, object]]:
    return {t: asdict(RULES.get(t)) for t in TASKS}
