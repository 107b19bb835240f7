"""The search's decisions are pure functions of its log: replayed, a finished search suggests and
prunes exactly as it did live, for each sampler; ASHA judges only at its rungs; importances name
the dimension that mattered."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping

import msgspec
import pytest

from swarmtrain.common.search import SearchSpec, Value
from swarmtrain.scheduler.search import Entry, Finished, Replay, Reported, Suggested, best, importances

SPACE = {
    "lr": {"log_uniform": [1e-4, 1e-1]},
    "batch_size": {"choice": [32, 64, 128]},
    "epochs": {"int": [2, 12]},
}


def spec(sampler: str = "tpe", pruner: Mapping[str, object] | None = None, **extra: object) -> SearchSpec:
    body: dict[str, object] = {"space": SPACE, "trials": 24, "sampler": sampler, **extra}
    if pruner is not None:
        body["pruner"] = pruner
    return msgspec.convert(body, SearchSpec)


def curve(point: Mapping[str, Value], epoch: int) -> float:
    """A figure that rises with epochs and peaks at lr = 1e-2: what a trial reports."""
    lr = float(point["lr"])
    return (1 - math.exp(-epoch / 3)) * math.exp(-((math.log10(lr) + 2) ** 2))


def run_live(
    s: SearchSpec,
    seed: int,
    trials: int,
    concurrency: int = 1,
    figure: Callable[[Mapping[str, Value], int], float] = curve,
) -> tuple[list[Entry], Replay]:
    """A search as the scheduler runs it: suggest, record, report each epoch, prune or finish;
    ``concurrency`` trials are suggested before the first of them reports (peers run side by side)."""
    live = Replay(s, seed)
    log: list[Entry] = []
    n = 0
    while n < trials:
        batch = range(n, min(n + concurrency, trials))
        for t in batch:
            log.append(Suggested(t, live.suggest(t)))
            live.extend(log)
        for t in batch:
            point = next(e.point for e in log if isinstance(e, Suggested) and e.trial == t)
            epochs = int(point["epochs"]) if "epochs" in point else 6
            for epoch in range(1, epochs + 1):
                log.append(Reported(t, epoch, figure(point, epoch)))
                live.extend(log)
                if live.decisions[-1].prune:
                    log.append(Finished(t, None, pruned=True))
                    break
            else:
                log.append(Finished(t, figure(point, epochs)))
            live.extend(log)
        n += concurrency
    return log, live


@pytest.mark.parametrize("sampler", ["random", "tpe"])
@pytest.mark.parametrize(
    "pruner",
    [{"name": "none"}, {"name": "median", "min_epochs": 2}, {"name": "asha", "min_epochs": 1, "reduction_factor": 3}],
)
def test_a_replayed_search_decides_as_it_did_live(sampler: str, pruner: Mapping[str, object]) -> None:
    s = spec(sampler, pruner)
    log, live = run_live(s, seed=7, trials=14, concurrency=3)
    fresh = Replay(s, 7).extend(log)
    assert fresh.decisions == live.decisions
    assert fresh.suggest(14) == live.suggest(14)
    # A scheduler restarted halfway through the log rebuilds the same study, entry by entry.
    half = Replay(s, 7).extend(log[: len(log) // 2])
    assert half.extend(log).suggest(14) == live.suggest(14)
    # Each point is what the log says: re-asking a replayed study gives the recorded point.
    for entry in log:
        if isinstance(entry, Suggested):
            prefix = log[: log.index(entry)]
            assert Replay(s, 7).extend(prefix).suggest(entry.trial) == dict(entry.point)
            break


def test_the_seed_decides_the_points_and_suggesting_records_nothing() -> None:
    s = spec("random")
    a, b = Replay(s, 1), Replay(s, 2)
    assert a.suggest(0) != b.suggest(0)
    assert a.suggest(0) == a.suggest(0) == Replay(s, 1).suggest(0)
    assert len(a.study.trials) == 0
    assert Replay(spec("random", seed=5), 1).suggest(0) == Replay(spec("random", seed=5), 99).suggest(0)


def test_a_grid_visits_every_point_once_even_with_trials_in_flight() -> None:
    s = msgspec.convert(
        {"space": {"epochs": {"int": [1, 3]}, "batch_size": {"choice": [16, 32]}}, "trials": 6, "sampler": "grid"},
        SearchSpec,
    )
    log, _ = run_live(s, seed=0, trials=6, concurrency=4, figure=lambda p, e: float(e))
    points = [tuple(sorted(e.point.items())) for e in log if isinstance(e, Suggested)]
    assert len(points) == 6 and len(set(points)) == 6


def test_asha_judges_at_its_rungs_and_keeps_the_best() -> None:
    s = spec("random", {"name": "asha", "min_epochs": 2, "reduction_factor": 3})
    log, live = run_live(s, seed=3, trials=18)
    pruned = [d for d in live.decisions if d.prune]
    assert pruned, "asha pruned nothing of 18 trials"
    assert {d.epoch for d in pruned} <= {2, 6, 18}  # rungs: min_epochs * reduction_factor**k
    finished = {e.trial: e for e in log if isinstance(e, Finished)}
    top = best(live)
    assert top is not None and not finished[top[0]].pruned
    completed = [e.value for e in finished.values() if e.value is not None]
    assert top[1] == max(completed)


def test_median_prunes_a_trial_below_the_median_of_its_epoch() -> None:
    s = spec("random", {"name": "median", "min_epochs": 1})
    r = Replay(s, 0)
    log: list[Entry] = []
    for t, level in enumerate([0.8, 0.9, 0.1]):
        log.append(Suggested(t, r.suggest(t)))
        r.extend(log)
        for epoch in (1, 2):
            log.append(Reported(t, epoch, level))
            r.extend(log)
            if r.decisions[-1].prune:
                log.append(Finished(t, None, pruned=True))
                break
        else:
            log.append(Finished(t, level))
        r.extend(log)
    assert [d for d in r.decisions if d.prune] == [type(r.decisions[0])(2, 1, True)]


def test_a_repeated_or_late_figure_changes_nothing() -> None:
    s = spec("random", {"name": "median", "min_epochs": 1})
    r = Replay(s, 0)
    log: list[Entry] = [Suggested(0, r.suggest(0))]
    log += [Reported(0, 1, 0.5), Reported(0, 1, 0.1), Finished(0, 0.5), Reported(0, 2, 0.9)]
    r.extend(log)
    assert len(r.decisions) == 1
    assert r.study.trials[0].intermediate_values == {1: 0.5} and r.study.trials[0].value == 0.5


def test_importance_names_the_dimension_that_mattered() -> None:
    s = msgspec.convert(
        {
            "space": {"lr": {"log_uniform": [1e-4, 1e-1]}, "batch_size": {"choice": [32, 64, 128]}},
            "trials": 30,
            "sampler": "random",
        },
        SearchSpec,
    )
    noise = random.Random(0)
    _, live = run_live(s, seed=0, trials=30, figure=lambda p, e: curve(p, 6) + noise.uniform(0, 1e-3))
    found = importances(live)
    assert set(found) == {"lr", "batch_size"}
    assert found["lr"] > found["batch_size"]
    assert importances(Replay(s, 0)) == {}
