"""Outer optimizers: the step from a round's start to the next round's model, given the aggregate.

The round's pseudo-gradient is ``g = start - aggregate`` (what plain fedavg moves by, with the sign
of a gradient). An outer optimizer turns it into the next model with its own learning rate and
state (FedAvgM, DiLoCo's Nesterov step, FedAdam; see :class:`~swarmtrain.common.fedopts.OuterSpec`).

:func:`outer_step` is a pure function ``(spec, start, aggregate, state) -> (weights, state)``. The
state is an explicit ``dict[str, torch.Tensor]`` (float64, on the CPU), returned rather than kept,
so a peer that joins late rebuilds it by replaying every round's ``(start, aggregate)`` from the
log; ``{}`` is the state before the first round. Bit for bit on every machine: float64, elementwise
IEEE operations only (``sqrt`` and ``/`` are correctly rounded), powers of the betas kept as running
products in the state rather than taken with ``pow``; one cast back to each tensor's dtype.
``none`` returns the aggregate itself, so today's sessions keep their bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from swarmtrain.common.fedopts import OuterSpec, resolve_outer
from swarmtrain.training.averaging import Tensors

State = dict[str, torch.Tensor]
"""Keys: ``step``, and per float tensor ``momentum/<name>`` (momentum, nesterov) or ``m/<name>``,
``v/<name>`` plus ``beta1_power``, ``beta2_power`` (adam)."""

__all__ = ["OUTER", "OuterSpec", "State", "outer_step", "pseudo_gradient"]


def pseudo_gradient(start: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]) -> Tensors:
    """``start - aggregate`` for every float tensor, in float64 on the CPU."""
    return {
        name: start[name].detach().to("cpu", torch.float64) - aggregate[name].detach().to("cpu", torch.float64)
        for name in sorted(start)
        if start[name].is_floating_point()
    }


def outer_step(
    spec: OuterSpec,
    start: Mapping[str, torch.Tensor],
    aggregate: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
) -> tuple[Tensors, State]:
    """The next round's model and the optimizer's new state; ``state`` is not modified.

    ``start`` and ``aggregate`` share names, shapes and dtypes; non-float tensors come from the
    aggregate. ``spec.lr`` None is the rule's default (:func:`resolve_outer`).
    """
    if sorted(start) != sorted(aggregate):
        raise ValueError("start and aggregate hold different tensors")
    spec = resolve_outer(spec)
    assert spec.lr is not None
    if spec.name == "none":  # the aggregate's own tensors (new ones, made by the aggregator)
        return {name: aggregate[name].detach().to("cpu") for name in sorted(aggregate)}, dict(state)
    g = pseudo_gradient(start, aggregate)
    steps, new_state = OUTER[spec.name](spec, g, state)
    out: Tensors = {}
    for name in sorted(aggregate):
        if name in steps:
            out[name] = (start[name].detach().to("cpu", torch.float64) - spec.lr * steps[name]).to(start[name].dtype)
        else:
            out[name] = aggregate[name].detach().to("cpu").clone()
    step = float(state["step"]) + 1.0 if "step" in state else 1.0
    new_state["step"] = torch.tensor(step, dtype=torch.float64)
    return out, new_state


Rule = Callable[[OuterSpec, Tensors, Mapping[str, torch.Tensor]], tuple[Tensors, State]]
"""``(spec, g, state) -> (direction, new state)``; the model moves by ``-lr * direction``."""


def _momentum(spec: OuterSpec, g: Tensors, state: Mapping[str, torch.Tensor]) -> tuple[Tensors, State]:
    new: State = {}
    for name, grad in g.items():
        buf = state.get(f"momentum/{name}")
        new[f"momentum/{name}"] = grad.clone() if buf is None else buf * spec.beta1 + grad
    return {name: new[f"momentum/{name}"] for name in g}, new


def _nesterov(spec: OuterSpec, g: Tensors, state: Mapping[str, torch.Tensor]) -> tuple[Tensors, State]:
    buffers, new = _momentum(spec, g, state)
    return {name: grad + buffers[name] * spec.beta1 for name, grad in g.items()}, new


def _adam(spec: OuterSpec, g: Tensors, state: Mapping[str, torch.Tensor]) -> tuple[Tensors, State]:
    b1, b2 = spec.beta1, spec.beta2
    p1 = float(state["beta1_power"]) * b1 if "beta1_power" in state else b1
    p2 = float(state["beta2_power"]) * b2 if "beta2_power" in state else b2
    new: State = {
        "beta1_power": torch.tensor(p1, dtype=torch.float64),
        "beta2_power": torch.tensor(p2, dtype=torch.float64),
    }
    direction: Tensors = {}
    for name, grad in g.items():
        m0 = state.get(f"m/{name}", torch.zeros_like(grad))
        v0 = state.get(f"v/{name}", torch.zeros_like(grad))
        m = m0 * b1 + grad * (1.0 - b1)
        v = v0 * b2 + (grad * grad) * (1.0 - b2)
        new[f"m/{name}"], new[f"v/{name}"] = m, v
        direction[name] = (m / (1.0 - p1)) / (torch.sqrt(v / (1.0 - p2)) + spec.eps)
    return direction, new


OUTER: dict[str, Rule] = {"momentum": _momentum, "nesterov": _nesterov, "adam": _adam}
"""Every stateful rule by name; ``none`` is handled by :func:`outer_step` itself."""
