"""The model kinds' builders: one module a kind (``mlp``, ``cnn``, ``resnet``, ``transformer``,
``layers``), each registered in ``base.MODELS`` where it is defined. Importing the package imports
each by name; the names must be the contract's (``common.models.KINDS``). A new kind: ``<kind>.py`` here with
``@MODELS.register("<kind>")``, imported below, its spec in ``common.models``, its test in
``tests/training/test_model_<kind>.py``."""

from __future__ import annotations

from torch import nn

from swarmtrain.common.models import KINDS, DataShape, ModelSpec
from swarmtrain.training.models import cnn, layers, mlp, resnet, transformer
from swarmtrain.training.models.base import MODELS, Builder

MODULES = (mlp, cnn, resnet, transformer, layers)
MODELS.check_names(KINDS.list())


def build_layers(spec: ModelSpec, shape: DataShape) -> list[nn.Module]:
    """The layers ``spec``'s kind builds on data of ``shape`` (``ShapeError`` where it cannot)."""
    return MODELS.get(spec.kind)(spec, shape)


__all__ = ["MODELS", "MODULES", "Builder", "build_layers"]
