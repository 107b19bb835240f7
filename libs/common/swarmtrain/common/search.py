"""A sweep that searches: the search a session may carry instead of a list of hyperparameters.

The contract's side, stated once and read by the gateway (``check``: a 400's reason) and the
scheduler (which suggests, prunes and ranks with Optuna, ``scheduler/search.py``)::

    {"space": {"lr": {"log_uniform": [1e-4, 1e-1]}, "batch_size": {"choice": [32, 64, 128]},
               "epochs": {"int": [5, 30]}, "model.hidden.0": {"choice": [64, 128, 256]}},
     "trials": 40, "sampler": "tpe", "pruner": {"name": "asha", "min_epochs": 2, "reduction_factor": 3},
     "metric": "val_accuracy", "direction": "maximize", "seed": 0}

A key names a hyperparameter (a field of ``Hyperparameters``) or a numeric field of the session's
model spec as ``model.<field>`` (``model.<field>.<index>`` for one width of a list). A suggested
point is applied to the session's own values (``apply``), and every value a space can produce is
checked against the contract's bounds before any trial runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

MAX_TRIALS: Final = 1_000
MAX_SPACE: Final = 32
MAX_CHOICES: Final = 64
MAX_RUNG_FACTOR: Final = 16

Value = float | int | str
"""One hyperparameter's value, as the log records it."""

H = TypeVar("H", bound=msgspec.Struct)
M = TypeVar("M", bound=msgspec.Struct)

Sampler = Literal["random", "grid", "tpe"]
Direction = Literal["maximize", "minimize"]
Metric = Literal["val_accuracy", "val_loss"]

METRIC_DIRECTIONS: Final[Mapping[str, Direction]] = {"val_accuracy": "maximize", "val_loss": "minimize"}
"""Each figure a trial can be judged by, and which way is better (a task's default comes first)."""

Bound = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]
Range = Annotated[list[Bound], msgspec.Meta(min_length=2, max_length=2)]
IntRange = Annotated[list[int], msgspec.Meta(min_length=2, max_length=2)]
Choices = Annotated[list[Value], msgspec.Meta(min_length=1, max_length=MAX_CHOICES)]


class Param(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One dimension of a space: exactly one of its fields."""

    log_uniform: Range | None = None
    uniform: Range | None = None
    int: IntRange | None = None
    choice: Choices | None = None

    @property
    def form(self) -> str:
        return next(k for k in ("log_uniform", "uniform", "int", "choice") if getattr(self, k) is not None)

    def points(self) -> list[Value] | None:
        """The values a grid visits: every choice, every integer of an ``int`` range; None for a
        continuous range (which a grid cannot enumerate)."""
        if self.choice is not None:
            return list(self.choice)
        if self.int is not None:
            return list(range(self.int[0], self.int[1] + 1))
        return None

    def ends(self) -> list[Value]:
        """The values whose bounds cover every value the dimension can produce."""
        if self.choice is not None:
            return list(self.choice)
        pair = self.log_uniform or self.uniform or self.int
        assert pair is not None
        return list(pair)


class PrunerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Literal["none", "median", "asha"] = "none"
    min_epochs: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    """asha: the first rung (epochs); median: a trial is judged only from this epoch on."""
    reduction_factor: Annotated[int, msgspec.Meta(ge=2, le=MAX_RUNG_FACTOR)] = 3
    """asha: the top 1/reduction_factor of the trials at a rung go on to the next."""


class SearchSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    space: Annotated[dict[str, Param], msgspec.Meta(min_length=1, max_length=MAX_SPACE)]
    trials: Annotated[int, msgspec.Meta(ge=1, le=MAX_TRIALS)]
    sampler: Sampler = "tpe"
    pruner: PrunerSpec = msgspec.field(default_factory=PrunerSpec)
    metric: Metric | None = None
    """The figure trials are ranked and pruned by; None: the session's task's (``val_accuracy``)."""
    direction: Direction | None = None
    """None: the metric's own (``METRIC_DIRECTIONS``)."""
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] | None = None
    """The sampler's seed; None: the session's."""

    def resolved(self, task_metric: Metric = "val_accuracy") -> tuple[Metric, Direction]:
        metric = self.metric or task_metric
        return metric, self.direction or METRIC_DIRECTIONS[metric]


def _path(key: str) -> list[str]:
    return key.split(".")


def _target(key: str, hyperparameters: msgspec.Struct, model: msgspec.Struct) -> tuple[str, Any] | str:
    """(``hyperparameters`` or ``model``, the current value) the key reaches, or why it reaches nothing."""
    parts = _path(key)
    if parts[0] != "model":
        if len(parts) != 1 or parts[0] not in hyperparameters.__struct_fields__:
            known = ", ".join(hyperparameters.__struct_fields__)
            return f"unknown key {key!r}: a hyperparameter ({known}) or model.<field>"
        return "hyperparameters", getattr(hyperparameters, parts[0])
    if len(parts) not in (2, 3) or parts[1] not in model.__struct_fields__ or parts[1] == "kind":
        fields = ", ".join(f for f in model.__struct_fields__ if f != "kind")
        return f"unknown key {key!r}: the model has {fields}"
    value = getattr(model, parts[1])
    if len(parts) == 3:
        if not isinstance(value, list) or not parts[2].isdigit() or int(parts[2]) >= len(value):
            return f"unknown key {key!r}: model.{parts[1]} has no element {parts[2]}"
        value = value[int(parts[2])]
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = type(value).__name__
        return f"{key!r} is not a number of the model (it is a {kind}): name one element, model.{parts[1]}.<index>"
    return "model", value


def apply(point: Mapping[str, Value], hyperparameters: H, model: M) -> tuple[H, M]:
    """The session's hyperparameters and model with a suggested point set, checked against the
    contract's bounds (``msgspec.ValidationError`` names the field)."""
    hp = msgspec.to_builtins(hyperparameters)
    mo = msgspec.to_builtins(model)
    for key, value in point.items():
        parts = _path(key)
        if parts[0] != "model":
            hp[parts[0]] = value
        elif len(parts) == 2:
            mo[parts[1]] = value
        else:
            mo[parts[1]][int(parts[2])] = value
    return msgspec.convert(hp, type(hyperparameters)), msgspec.convert(mo, type(model))


def grid_size(spec: SearchSpec) -> int | None:
    """How many points a grid over the space has; None when a dimension is continuous."""
    size = 1
    for param in spec.space.values():
        points = param.points()
        if points is None:
            return None
        size *= len(points)
    return size


def check(spec: SearchSpec, hyperparameters: msgspec.Struct, model: msgspec.Struct) -> str | None:
    """Why a session cannot search this space (a 400's reason); None when it can. ``hyperparameters``
    and ``model`` are the session's own: what each point is applied to."""
    for key, param in spec.space.items():
        forms = [k for k in ("log_uniform", "uniform", "int", "choice") if getattr(param, k) is not None]
        if len(forms) != 1:
            return f"{key}: give exactly one of log_uniform, uniform, int, choice (got {len(forms) or 'none'})"
        target = _target(key, hyperparameters, model)
        if isinstance(target, str):
            return target
        _, current = target
        pair = param.log_uniform or param.uniform
        if pair is not None:
            low, high = pair
            if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                return f"{key}: {param.form} [{low:g}, {high:g}] is an empty range (low must be below high)"
            if param.log_uniform is not None and low <= 0:
                return f"{key}: log_uniform needs a positive low (got {low:g})"
            if isinstance(current, int):
                return f"{key} takes whole numbers: use int or choice"
        if param.int is not None and param.int[0] > param.int[1]:
            return f"{key}: int [{param.int[0]}, {param.int[1]}] is an empty range"
        if param.choice is not None and len(set(map(repr, param.choice))) != len(param.choice):
            return f"{key}: choice lists a value twice"
        for value in param.ends():
            try:
                apply({key: value}, hyperparameters, model)
            except msgspec.ValidationError as e:
                return f"{key}: the value {value!r} is out of bounds ({e})"
    if spec.sampler == "grid":
        size = grid_size(spec)
        if size is None:
            continuous = [k for k, p in spec.space.items() if p.points() is None]
            return f"grid needs choice or int dimensions; {', '.join(continuous)} is continuous"
        if size > spec.trials:
            return f"the grid has {size} points, more than trials ({spec.trials})"
    return None
