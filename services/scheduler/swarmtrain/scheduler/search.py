"""A search's decisions, as pure functions of its log: the next trial's point, whether a trial
stops at a rung, and what mattered. Optuna does the work (its samplers, pruners and importance
evaluators); this module only replays the log into an in-memory study.

The log of a search is a sequence of entries in the order the scheduler appended them: a trial
suggested (with the point it got), a figure a trial reached at an epoch, a trial finished (its
figure), pruned or failed. Replaying it re-asks every suggestion with the same per-trial seed, so
the study the replay ends with is the one a scheduler that never stopped would hold: the n-th
suggestion depends only on the session's seed and what the log says happened before it, and a
restarted scheduler suggests exactly the same next trial. ``Replay`` keeps its study and extends
it entry by entry (the scheduler holds one per session); a fresh ``Replay`` of the same entries
decides the same.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from swarmtrain.common.search import Metric, Param, SearchSpec, Value

optuna.logging.set_verbosity(logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Suggested(NamedTuple):
    trial: int
    point: Mapping[str, Value]


class Reported(NamedTuple):
    trial: int
    epoch: int
    value: float


class Finished(NamedTuple):
    trial: int
    value: float | None
    """The trial's figure; None: it failed (its peer's run did, and it was not re-run)."""
    pruned: bool = False


Entry = Suggested | Reported | Finished


class Decision(NamedTuple):
    """What the pruner said of one ``Reported`` entry."""

    trial: int
    epoch: int
    prune: bool


def distribution(param: Param) -> BaseDistribution:
    if param.log_uniform is not None:
        return FloatDistribution(param.log_uniform[0], param.log_uniform[1], log=True)
    if param.uniform is not None:
        return FloatDistribution(param.uniform[0], param.uniform[1])
    if param.int is not None:
        return IntDistribution(param.int[0], param.int[1])
    assert param.choice is not None
    return CategoricalDistribution(param.choice)


def trial_seed(seed: int, trial: int) -> int:
    """The sampler's seed for the n-th suggestion: each is drawn from its own generator, so it
    depends on the trials before it only through the study, never through an RNG's history."""
    return (seed * 1_000_003 + trial * 7_919) % 2**32


def _sampler(spec: SearchSpec, base_seed: int, trial: int) -> optuna.samplers.BaseSampler:
    seed = trial_seed(base_seed, trial)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        # One seed for every ask: the grid's order is a shuffle by its seed, and the study records
        # each trial's place in that order.
        points = {key: param.points() for key, param in spec.space.items()}
        return optuna.samplers.GridSampler({k: v for k, v in points.items() if v is not None}, seed=base_seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.trials // 4)))


def _pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs, reduction_factor=p.reduction_factor)
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=p.min_epochs - 1)
    return optuna.pruners.NopPruner()


_NEUTRAL = optuna.samplers.RandomSampler(seed=0)


class Replay:
    """A search's log replayed into an Optuna study."""

    def __init__(self, spec: SearchSpec, seed: int, metric: Metric = "val_accuracy") -> None:
        self.spec = spec
        self.seed = seed if spec.seed is None else spec.seed
        _, direction = spec.resolved(metric)
        self.study = optuna.create_study(direction=direction, pruner=_pruner(spec), sampler=_NEUTRAL)
        self.distributions = {key: distribution(param) for key, param in spec.space.items()}
        self.trials: dict[int, optuna.Trial] = {}
        self.decisions: list[Decision] = []
        self.epochs: dict[int, set[int]] = {}
        self.finished: set[int] = set()
        self.applied = 0

    def extend(self, entries: Sequence[Entry]) -> Replay:
        """Apply the entries past those already applied (``entries`` is the whole log so far)."""
        for entry in entries[self.applied :]:
            self._apply(entry)
            self.applied += 1
        return self

    def _ask(self, trial: int) -> optuna.Trial:
        self.study.sampler = _sampler(self.spec, self.seed, trial)
        try:
            return self.study.ask(self.distributions)
        finally:
            # Reports and tells go through a sampler that keeps no state and stops nothing (a
            # grid's own would stop the study, outside an optimize loop, once its points ran out).
            self.study.sampler = _NEUTRAL

    def _apply(self, entry: Entry) -> None:
        match entry:
            case Suggested(trial, point):
                asked = self._ask(trial)
                if asked.params != dict(point):
                    # A log written with another Optuna: believe the log, not the re-ask.
                    self.study.tell(asked, state=TrialState.FAIL)
                    self.study.enqueue_trial(dict(point))
                    asked = self.study.ask(self.distributions)
                self.trials[trial] = asked
            case Reported(trial, epoch, value):
                asked = self.trials[trial]
                if trial in self.finished or epoch in self.epochs.setdefault(trial, set()):
                    return  # a figure after the trial ended, or one epoch's twice: the first stands
                self.epochs[trial].add(epoch)
                asked.report(value, epoch)
                self.decisions.append(Decision(trial, epoch, asked.should_prune()))
            case Finished(trial, value, pruned):
                asked = self.trials[trial]
                if trial in self.finished:
                    return
                self.finished.add(trial)
                if pruned:
                    self.study.tell(asked, state=TrialState.PRUNED)
                elif value is None:
                    self.study.tell(asked, state=TrialState.FAIL)
                else:
                    self.study.tell(asked, value)

    def suggest(self, trial: int) -> dict[str, Value]:
        """The point the ``trial``-th trial (counted from 0) gets, asked of a copy of the study so
        that nothing is recorded: the log's ``Suggested`` entry records it, and applying that entry
        asks the study itself, in the same state with the same seed, for the same point."""
        study, self.study = self.study, copy.deepcopy(self.study)
        try:
            return dict(self._ask(trial).params)
        finally:
            self.study = study


def suggest(spec: SearchSpec, seed: int, entries: Sequence[Entry], trial: int) -> dict[str, Value]:
    """The ``trial``-th point of a search whose log is ``entries`` (a fresh replay: pure)."""
    replay = Replay(spec, seed).extend(entries)
    return replay.suggest(trial)


def importances(replay: Replay) -> dict[str, float]:
    """Each dimension's share in explaining the finished trials' figures (Optuna's default
    evaluator, PED-ANOVA), most important first; {} until two trials finished with a figure."""
    complete = [t for t in replay.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    return dict(optuna.importance.get_param_importances(replay.study))


def best(replay: Replay) -> tuple[int, float] | None:
    """The finished trial with the best figure (its number, its figure); None before one finished."""
    numbers = {asked.number: n for n, asked in replay.trials.items()}
    complete = [t for t in replay.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    top = replay.study.best_trial
    assert top.value is not None
    return numbers[top.number], top.value
