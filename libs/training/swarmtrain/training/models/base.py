"""What a model kind's builder is, and the registry every kind adds its builder to.

A builder makes the layers a kind's spec describes (the contract's ``common.models``: the spec and
its static facts), after the ``Standardize`` that ``training.model.build_model`` puts first:
``build(spec, shape) -> list[nn.Module]`` ending in ``shape.classes`` logits, built from torch's
global generator in a fixed order (so a seeded build gives the same weights on every machine).
It has exactly ``spec.parameter_count(shape)`` parameters (each kind's test checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from swarmtrain.common.models import DataShape, linear_widths
from swarmtrain.common.registry import Registry

Builder = Callable[[Any, DataShape], list[nn.Module]]
"""``(spec of the kind, the data's shape) -> the layers after Standardize``."""

MODELS: Registry[Builder] = Registry("model kind")
"""Every kind's builder by its contract name: ``@MODELS.register("<kind>")`` in ``models/<kind>.py``."""


def dense(hidden: list[int], flat: int, classes: int) -> list[nn.Module]:
    """Linear layers of ``hidden`` sizes with ReLU between, from ``flat`` inputs to ``classes`` logits."""
    widths = linear_widths(hidden, flat, classes)
    layers: list[nn.Module] = []
    for n_in, n_out in widths[:-1]:
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    layers.append(nn.Linear(*widths[-1]))
    return layers
