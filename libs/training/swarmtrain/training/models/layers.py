"""The ``layers`` kind (``common.models.LayersSpec``): each allow-listed layer of
``common.layers`` as its torch module, in order; a residual block adds its input back. Nothing
here but this fixed mapping: a spec's names pick modules from it, they are never imported."""

from __future__ import annotations

import torch
from torch import nn

from swarmtrain.common import layers as L
from swarmtrain.common.models import DataShape, LayersSpec
from swarmtrain.training.models.attention import SelfAttention
from swarmtrain.training.models.base import MODELS


class Residual(nn.Module):
    def __init__(self, body: list[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


class MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


class LongIds(nn.Module):
    """Token ids as ``long`` (an exported model may be fed int32 or float ids)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


_ACTIVATIONS: dict[type[L.LayerSpec], type[nn.Module]] = {
    L.ReLU: nn.ReLU,
    L.GELU: nn.GELU,
    L.SiLU: nn.SiLU,
    L.Tanh: nn.Tanh,
    L.Sigmoid: nn.Sigmoid,
}
_POOLS: dict[type[L.LayerSpec], type[nn.Module]] = {
    L.MaxPool1d: nn.MaxPool1d,
    L.MaxPool2d: nn.MaxPool2d,
    L.AvgPool1d: nn.AvgPool1d,
    L.AvgPool2d: nn.AvgPool2d,
}


def _module(layer: L.Layer, ins: L.Sig, vocab: int) -> nn.Module:
    match layer:
        case L.Linear(out=out, bias=bias):
            return nn.Linear(ins.dims[-1], out, bias=bias)
        case L.Conv1d(out=out, kernel=k, stride=s, padding=p):
            return nn.Conv1d(ins.dims[0], out, k, stride=s, padding=p)
        case L.Conv2d(out=out, kernel=k, stride=s, padding=p):
            return nn.Conv2d(ins.dims[0], out, k, stride=s, padding=p)
        case L.BatchNorm():
            return nn.BatchNorm2d(ins.dims[0]) if len(ins.dims) == 3 else nn.BatchNorm1d(ins.dims[0])
        case L.LayerNorm():
            return nn.LayerNorm(ins.dims[-1])
        case L.Dropout(p=p):
            return nn.Dropout(p)
        case L.Embedding(dim=dim):
            return nn.Sequential(LongIds(), nn.Embedding(vocab, dim))
        case L.GlobalAvgPool():
            return GlobalAvgPool()
        case L.MeanTokens():
            return MeanTokens()
        case L.Flatten():
            return nn.Flatten()
        case L.Reshape(shape=dims):
            return (
                nn.Unflatten(1, tuple(dims))
                if len(ins.dims) == 1
                else nn.Sequential(nn.Flatten(), nn.Unflatten(1, tuple(dims)))
            )
        case L.Attention(heads=heads, causal=causal):
            return SelfAttention(ins.dims[1], heads, causal=causal)
    if (act := _ACTIVATIONS.get(type(layer))) is not None:
        return act()
    if (pool := _POOLS.get(type(layer))) is not None:
        assert isinstance(layer, L._Pool)
        return pool(layer.kernel, stride=layer.stride or layer.kernel)
    raise AssertionError(f"no module for {type(layer).__name__}")


def _stack(layers: list[L.Layer], ins: L.Sig, vocab: int) -> list[nn.Module]:
    modules: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, L.Residual):
            modules.append(Residual(_stack(layer.layers, ins, vocab)))
            continue
        modules.append(_module(layer, ins, vocab))
        ins, _ = layer.infer(ins, vocab)
    return modules


@MODELS.register("layers")
def build(spec: LayersSpec, shape: DataShape) -> list[nn.Module]:
    spec.check(shape)
    ins = spec.input(shape)
    front: list[nn.Module] = [nn.Unflatten(1, ins.dims)] if len(ins.dims) > 1 and not ins.tokens else []
    assert spec.layers is not None
    return front + _stack(spec.layers, ins, shape.vocab)
