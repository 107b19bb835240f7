"""The ``mlp`` kind: linear layers of ``hidden`` sizes with ReLU between (``common.models.MlpSpec``)."""

from __future__ import annotations

from torch import nn

from swarmtrain.common.models import DataShape, MlpSpec
from swarmtrain.training.models.base import MODELS, dense


@MODELS.register("mlp")
def build(spec: MlpSpec, shape: DataShape) -> list[nn.Module]:
    spec.check(shape)
    return dense(spec.hidden, shape.features, shape.classes)
