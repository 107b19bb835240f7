"""The ``cnn`` kind (``common.models.CnnSpec``): the features reshaped to ``input_shape`` [C, H, W];
the convolutions ``CnnSpec.conv_layers`` lists (3x3 with padding 1, ReLU, then a 2x2 max-pool where
it says); flattened; then linear layers of ``hidden`` sizes with ReLU."""

from __future__ import annotations

from torch import nn

from swarmtrain.common.models import KERNEL, POOL, CnnSpec, DataShape
from swarmtrain.training.models.base import MODELS, dense


@MODELS.register("cnn")
def build(spec: CnnSpec, shape: DataShape) -> list[nn.Module]:
    spec.check(shape)
    convs, flat = spec.conv_layers(shape)
    layers: list[nn.Module] = [nn.Unflatten(1, spec.image(shape))]
    for conv in convs:
        layers += [nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=KERNEL, padding=KERNEL // 2), nn.ReLU()]
        if conv.pool:
            layers.append(nn.MaxPool2d(POOL))
    layers.append(nn.Flatten())
    return layers + dense(spec.hidden, flat, shape.classes)
