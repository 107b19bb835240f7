"""Outer optimizers: known values, explicit state rebuilt by replay, today's bytes kept by ``none``."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from swarmtrain.common.fedopts import OUTER_DEFAULT_LR, OuterSpec, resolve_outer
from swarmtrain.training.outer import outer_step, pseudo_gradient


def _w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "n": torch.tensor([7])}


def test_none_returns_the_aggregate_itself() -> None:
    start, agg = _w(1.0, 2.0), _w(0.1 + 0.2, -3.0)
    out, state = outer_step(OuterSpec(), start, agg, {})
    assert torch.equal(out["w"], agg["w"]) and out["w"] is not agg["w"]
    assert state == {}


def test_pseudo_gradient_is_start_minus_aggregate_in_float64() -> None:
    g = pseudo_gradient(_w(1.0, 2.0), _w(0.5, 3.0))
    assert list(g) == ["w"] and g["w"].dtype == torch.float64 and g["w"].tolist() == [0.5, -1.0]


def test_momentum_known_values_over_two_rounds() -> None:
    spec = OuterSpec(name="momentum", lr=0.5, beta1=0.5)
    # round 1: g = 1 -> v = 1, w = 4 - 0.5 * 1
    out, state = outer_step(spec, _w(4.0), _w(3.0), {})
    assert out["w"].tolist() == [3.5] and state["momentum/w"].tolist() == [1.0]
    assert out["n"].tolist() == [7] and float(state["step"]) == 1.0
    # round 2: g = 2 -> v = 0.5 * 1 + 2 = 2.5, w = 3.5 - 1.25
    out, state = outer_step(spec, out, _w(1.5), state)
    assert out["w"].tolist() == [2.25] and state["momentum/w"].tolist() == [2.5]
    assert float(state["step"]) == 2.0


def test_nesterov_known_values_over_two_rounds() -> None:
    spec = OuterSpec(name="nesterov", lr=0.5, beta1=0.5)
    # round 1: g = 1, v = 1, direction = g + 0.5 v = 1.5, w = 4 - 0.75
    out, state = outer_step(spec, _w(4.0), _w(3.0), {})
    assert out["w"].tolist() == [3.25]
    # round 2: g = 1, v = 0.5 + 1 = 1.5, direction = 1 + 0.75 = 1.75, w = 3.25 - 0.875
    out, state = outer_step(spec, out, _w(2.25), state)
    assert out["w"].tolist() == [2.375] and state["momentum/w"].tolist() == [1.5]


def test_adam_known_values() -> None:
    spec = OuterSpec(name="adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    # first step with bias correction: m_hat = g, v_hat = g^2 -> lr * g / (|g| + eps)
    out, state = outer_step(spec, _w(1.0, 1.0), _w(0.5, 1.25), {})
    want = [1.0 - 0.1 * 0.5 / (0.5 + 1e-3), 1.0 + 0.1 * 0.25 / (0.25 + 1e-3)]
    assert out["w"].tolist() == pytest.approx(want, rel=1e-6)
    assert float(state["beta1_power"]) == 0.9 and float(state["beta2_power"]) == 0.99
    # second step with g = 0: m = 0.9 * 0.05 = 0.045, v = 0.99 * 0.0025, corrected by 0.19 and 0.0199
    out2, state = outer_step(spec, out, out, state)
    m_hat, v_hat = 0.045 / 0.19, 0.99 * 0.0025 / (1 - 0.99**2)
    assert float(out2["w"][0]) == pytest.approx(float(out["w"][0]) - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-3), rel=1e-6)


@pytest.mark.parametrize("name", ["none", "momentum", "nesterov", "adam"])
def test_state_rebuilt_by_replaying_rounds_gives_the_same_bits(name: str) -> None:
    """A newcomer replays each round's (start, aggregate) from the log: same weights, same state."""
    spec = resolve_outer(OuterSpec(name=name))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(3)
    aggregates = [{"w": torch.randn(64, generator=g), "b": torch.randn(8, generator=g).half()} for _ in range(5)]
    start = {"w": torch.zeros(64), "b": torch.zeros(8).half()}

    def run(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        weights = start
        for agg in aggregates:
            weights, state = outer_step(spec, weights, agg, state)
        return weights, state

    w1, s1 = run({})
    w2, s2 = run({})
    assert sorted(s1) == sorted(s2) and sorted(w1) == sorted(w2)
    for k in w1:
        assert w1[k].dtype == start[k].dtype
        assert w1[k].numpy().tobytes() == w2[k].numpy().tobytes()
    for k in s1:
        assert s1[k].dtype == torch.float64 and s1[k].numpy().tobytes() == s2[k].numpy().tobytes()


def test_state_passed_in_is_not_modified() -> None:
    spec = OuterSpec(name="adam", lr=0.01)
    _, state = outer_step(spec, _w(1.0), _w(0.0), {})
    frozen = {k: v.clone() for k, v in state.items()}
    outer_step(spec, _w(1.0), _w(0.5), state)
    assert all(torch.equal(state[k], frozen[k]) for k in frozen)


def test_defaults_resolve_and_constraints_hold() -> None:
    assert resolve_outer(OuterSpec(name="nesterov")).lr == OUTER_DEFAULT_LR["nesterov"]
    assert resolve_outer(OuterSpec(name="adam", lr=0.3)).lr == 0.3
    decode = msgspec.json.Decoder(OuterSpec).decode
    assert decode(b'{"name": "nesterov", "lr": 0.7, "beta1": 0.9}').beta1 == 0.9
    for bad in (b'{"name": "sgd"}', b'{"lr": 0}', b'{"beta1": 1.0}', b'{"eps": 0}'):
        with pytest.raises(msgspec.ValidationError):
            decode(bad)


def test_mismatched_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="different tensors"):
        outer_step(OuterSpec(name="momentum"), {"w": torch.zeros(1)}, {"v": torch.zeros(1)}, {})
