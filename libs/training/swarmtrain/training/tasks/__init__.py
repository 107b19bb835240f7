"""The tasks: one module a task (``base.TrainingTask``), registered in ``base.TASKS``. Importing the
package imports each by name; the names must be the contract's (``events.Task``; their facts:
``common.tasks``). Adding a task: its name in the contract, its facts in ``common.tasks``, one
module here and its test ``tests/training/test_task_<name>.py``."""

from __future__ import annotations

from swarmtrain.common.tasks import TASKS as NAMES
from swarmtrain.training.tasks import classification, language_modeling, regression
from swarmtrain.training.tasks.base import TASKS, Evaluation, TrainingTask

MODULES = (classification, regression, language_modeling)
TASKS.check_names(NAMES)


def task(name: str) -> TrainingTask:
    """``name``'s training halves; ``UnknownName`` for a name the contract does not have."""
    return TASKS.get(name)


__all__ = ["MODULES", "TASKS", "Evaluation", "TrainingTask", "task"]
