"""The ``resnet`` kind (``common.models.ResnetSpec``): the pixels reshaped to [C, H, W]; a 3x3
convolution with batch norm and ReLU; the basic blocks ``ResnetSpec.blocks`` lists; a global average
pool; the logits."""

from __future__ import annotations

import torch
from torch import nn

from swarmtrain.common.models import BasicBlock, DataShape, ResnetSpec, _image
from swarmtrain.training.models.base import MODELS


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the input (through a 1x1 convolution with
    batch norm where the shape changes), then ReLU."""

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        cin, cout, stride = block.in_channels, block.out_channels, block.stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if block.projects
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


@MODELS.register("resnet")
def build(spec: ResnetSpec, shape: DataShape) -> list[nn.Module]:
    spec.check(shape)
    c, _, _ = image = _image(spec.kind, spec.input_shape, shape)
    blocks, (last, _, _) = spec.blocks(shape)
    return [
        nn.Unflatten(1, image),
        nn.Conv2d(c, spec.width, 3, padding=1, bias=False),
        nn.BatchNorm2d(spec.width),
        nn.ReLU(),
        *(Block(b) for b in blocks),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(last, shape.classes),
    ]
