"""Aggregation rules: known values, order independence bit for bit, robustness, Krum's choice."""

from __future__ import annotations

import itertools
import typing

import msgspec
import pytest
import torch

from swarmtrain.common.fedopts import AggregatorName, AggregatorSpec, check_aggregator, check_options
from swarmtrain.training.aggregators import (
    AGGREGATORS,
    aggregate,
    check_krum,
    krum,
    krum_scores,
    mean,
    median,
    multi_krum,
    trimmed_mean,
)
from swarmtrain.training.averaging import weighted_average


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "1.weight": torch.randn(3, 4, generator=g) * scale,
        "1.bias": torch.randn(3, generator=g) * scale,
        "h": (torch.randn(5, generator=g) * scale).half(),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def _honest(n: int) -> list[tuple[str, dict[str, torch.Tensor], int]]:
    """``n`` updates near a common point: the start plus small, distinct moves."""
    start = _state(0)
    out = []
    for i in range(n):
        move = _state(100 + i, 0.01)
        tensors = {k: (v + move[k]) if v.is_floating_point() else v for k, v in start.items()}
        out.append((f"peer-{i}", tensors, 100 + i))
    return out


SPECS = [
    AggregatorSpec(name="mean"),
    AggregatorSpec(name="trimmed_mean", beta=0.2),
    AggregatorSpec(name="median"),
    AggregatorSpec(name="krum", f=1),
    AggregatorSpec(name="multi_krum", f=1),
    AggregatorSpec(name="multi_krum", f=1, m=2),
]


def test_registry_names_every_rule_of_the_contract() -> None:
    assert set(AGGREGATORS) == set(typing.get_args(AggregatorName))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.m}")
def test_every_rule_is_independent_of_input_order_bit_for_bit(spec: AggregatorSpec) -> None:
    updates = _honest(5)
    first = aggregate(spec, updates)
    for perm in itertools.islice(itertools.permutations(updates), 1, 30):
        again = aggregate(spec, list(perm))
        assert again.selected == first.selected
        assert sorted(again.tensors) == sorted(first.tensors)
        for name, t in first.tensors.items():
            assert again.tensors[name].dtype == t.dtype
            assert again.tensors[name].numpy().tobytes() == t.numpy().tobytes(), name


def test_mean_is_todays_weighted_average() -> None:
    updates = _honest(4)
    got = mean(list(reversed(updates)))
    want = weighted_average(updates)  # type: ignore[arg-type]
    assert all(torch.equal(got.tensors[k], want[k]) for k in want)
    assert got.selected == ("peer-0", "peer-1", "peer-2", "peer-3")


def test_median_and_trimmed_mean_known_values() -> None:
    values = [[1.0, -4.0], [7.0, 0.0], [3.0, 8.0], [-2.0, 2.0], [100.0, 1.0]]
    updates = [(f"p{i}", {"w": torch.tensor(v), "n": torch.tensor([i])}, 1) for i, v in enumerate(values)]
    assert median(updates).tensors["w"].tolist() == [3.0, 1.0]
    # even count: the mean of the two middle values
    assert median(updates[:4]).tensors["w"].tolist() == [2.0, 1.0]
    # beta 0.2 of 5 trims one from each end: column 0 keeps 1, 3, 7; column 1 keeps 0, 1, 2
    tm = trimmed_mean(updates, 0.2).tensors
    assert tm["w"].tolist() == [pytest.approx(11.0 / 3.0), 1.0]
    assert tm["n"].tolist() == [0]  # non-float: from the first update by peer id
    # beta small enough to trim nothing: the plain (unweighted) mean
    assert trimmed_mean(updates, 0.1).tensors["w"].tolist() == [pytest.approx(21.8), pytest.approx(1.4)]


def test_coordinatewise_rules_keep_dtypes_and_fixed_points() -> None:
    x = torch.randn(33) * 1e3
    updates = [(f"p{i}", {"x": x, "h": x.half(), "b": x.bfloat16()}, i + 1) for i in range(4)]
    for rule in (median(updates), trimmed_mean(updates, 0.25)):
        t = rule.tensors
        assert t["x"].dtype == torch.float32 and t["h"].dtype == torch.float16 and t["b"].dtype == torch.bfloat16
        assert torch.equal(t["x"], x) and torch.equal(t["h"], x.half()) and torch.equal(t["b"], x.bfloat16())


def _poisoned(n: int) -> tuple[list[tuple[str, dict[str, torch.Tensor], int]], dict[str, torch.Tensor]]:
    """``n`` honest updates plus one that flips its move's sign and scales it x100."""
    start = _state(0)
    updates = _honest(n)
    honest = updates[1]
    bad = {k: (start[k] - 100 * (v - start[k])) if v.is_floating_point() else v for k, v in honest[1].items()}
    updates.append(("peer-x", bad, 10**6))  # and it claims a huge sample count
    return updates, start


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_robust_rules_resist_one_sign_flipped_x100_update() -> None:
    updates, _ = _poisoned(4)
    clean = mean(updates[:-1]).tensors
    assert _distance(mean(updates).tensors, clean) > 1.0  # the weighted mean is ruined
    for rule in (median(updates), trimmed_mean(updates, 0.2), krum(updates, 1), multi_krum(updates, 1)):
        assert _distance(rule.tensors, clean) < 0.05
    assert "peer-x" not in krum(updates, 1).selected


def test_krum_selects_an_honest_update_unchanged_and_names_it() -> None:
    updates, _ = _poisoned(4)
    result = krum(updates, f=1)
    (chosen,) = result.selected
    assert chosen != "peer-x"
    assert result.scores["peer-x"] == max(result.scores.values())
    assert result.scores[chosen] == min(result.scores.values())
    source = dict((p, t) for p, t, _ in updates)[chosen]
    assert all(torch.equal(result.tensors[k], source[k]) for k in source)


def test_multi_krum_leaves_the_outlier_out() -> None:
    updates, _ = _poisoned(4)
    result = multi_krum(updates, f=1)  # m = n - f = 4
    assert result.selected == ("peer-0", "peer-1", "peer-2", "peer-3")
    honest = [(p, t, 1) for p, t, _ in updates[:-1]]
    want = weighted_average(honest)  # type: ignore[arg-type]
    assert all(torch.equal(result.tensors[k], want[k]) for k in want)


def test_krum_scores_known_values_and_ties_break_by_peer_id() -> None:
    # points 0, 1, 3, 10 on a line, f=0: each scores its n - 2 = 2 nearest squared distances
    updates = [(p, {"w": torch.tensor([v])}, 1) for p, v in [("d", 10.0), ("a", 0.0), ("b", 1.0), ("c", 3.0)]]
    assert krum_scores(updates, 0) == {"a": 1.0 + 9.0, "b": 1.0 + 4.0, "c": 4.0 + 9.0, "d": 49.0 + 81.0}
    assert krum(updates, 0).selected == ("b",)
    twins = [(p, {"w": torch.tensor([1.0])}, 1) for p in ("z", "y", "x")]
    assert krum(twins, 0).selected == ("x",)


@pytest.mark.parametrize(("n", "f", "ok"), [(3, 0, True), (4, 1, False), (5, 1, True), (6, 2, False), (7, 2, True)])
def test_impossible_f_is_refused(n: int, f: int, ok: bool) -> None:
    reason = check_krum(n, f)
    assert (reason is None) == ok
    spec = AggregatorSpec(name="krum", f=f)
    assert (check_aggregator(spec, n) is None) == ok
    assert (check_options(n, spec) is None) == ok
    updates = _honest(n)
    if ok:
        assert len(krum(updates, f).selected) == 1
    else:
        assert reason is not None and f"{2 * f + 3}" in reason
        with pytest.raises(ValueError, match="n >= 2f \\+ 3"):
            krum(updates, f)


def test_other_impossible_options_are_refused() -> None:
    assert check_aggregator(AggregatorSpec(name="trimmed_mean", beta=0.1), 4) is not None  # trims nothing
    assert check_aggregator(AggregatorSpec(name="trimmed_mean", beta=0.25), 4) is None
    assert check_aggregator(AggregatorSpec(name="multi_krum", f=1, m=5), 5) is not None  # m > n - f
    assert check_aggregator(AggregatorSpec(name="median"), 1) is None
    with pytest.raises(ValueError, match="m=5"):
        multi_krum(_honest(5), 1, 5)


def test_spec_constraints_are_enforced_by_the_decoder() -> None:
    decode = msgspec.json.Decoder(AggregatorSpec).decode
    assert decode(b'{"name": "krum", "f": 2}') == AggregatorSpec(name="krum", f=2)
    assert decode(b"{}") == AggregatorSpec()
    for bad in (b'{"name": "avg"}', b'{"beta": 0.5}', b'{"f": -1}', b'{"m": 0}', b'{"typo": 1}'):
        with pytest.raises(msgspec.ValidationError):
            decode(bad)


def test_refuses_empty_and_duplicate_updates() -> None:
    with pytest.raises(ValueError, match="nothing"):
        median([])
    a = _honest(1)[0]
    with pytest.raises(ValueError, match="more than one update"):
        trimmed_mean([a, a], 0.0)
