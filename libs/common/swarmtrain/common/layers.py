"""The ``layers`` model kind's vocabulary: one msgspec Struct per allow-listed module (tag field
``type``), with typed, bounded arguments, and the shape inference that checks a stack of them in pure
arithmetic (no torch): every layer's output shape, parameters, activations and FLOPs per sample.

A sample's shape excludes the batch: a table row is ``(features,)``, a token window ``(context,)``
(token ids: only an ``embedding`` takes them), a convolution's input ``(C, L)`` or ``(C, H, W)``,
an attention's ``(L, D)``. A spec that cannot be built raises ``ShapeError`` naming the layer's index
(``layer 3``, ``layer 2.1`` inside a residual block) and the reason. The peer's builder
(``training.models.layers``) makes exactly these modules, in this order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from swarmtrain.common.shapes import ShapeError

MAX_DIM: Final = 1 << 16
"""The most units, channels or embedding width one layer may have."""
MAX_KERNEL: Final = 31
MAX_LAYERS_TOTAL: Final = 256
"""The most layers one spec holds, residual blocks' contents counted."""
MAX_NESTING: Final = 4
"""Residual blocks within residual blocks, at most this deep."""
MAX_HEADS: Final = 256
MAX_ACTIVATION: Final = 1 << 32
"""The most values one layer's output may hold per sample."""

Dim = Annotated[int, msgspec.Meta(ge=1, le=MAX_DIM)]
Kernel = Annotated[int, msgspec.Meta(ge=1, le=MAX_KERNEL)]
Stride = Annotated[int, msgspec.Meta(ge=1, le=MAX_KERNEL)]
Padding = Annotated[int, msgspec.Meta(ge=0, le=MAX_KERNEL)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)]
Heads = Annotated[int, msgspec.Meta(ge=1, le=MAX_HEADS)]
ShapeDims = Annotated[list[Dim], msgspec.Meta(min_length=1, max_length=4)]


@dataclass(frozen=True, slots=True)
class Sig:
    """One sample's shape through the stack, and whether it is token ids (not values)."""

    dims: tuple[int, ...]
    tokens: bool = False


@dataclass(frozen=True, slots=True)
class Cost:
    parameters: int = 0
    activations: int = 0
    """Values per sample this layer's output holds (what training keeps for the backward pass)."""
    flops: int = 0
    """Forward floating-point operations per sample (a multiply-add is 2)."""

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.parameters + other.parameters, self.activations + other.activations, self.flops + other.flops)


def _numel(dims: tuple[int, ...]) -> int:
    return math.prod(dims)


class LayerSpec(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """One allow-listed module; a subclass per ``type``."""

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        """The output shape and this layer's cost on input ``ins``; ``ShapeError`` (a bare reason:
        the caller prefixes the index) where it does not fit."""
        raise NotImplementedError

    def _values(self, ins: Sig) -> tuple[int, ...]:
        if ins.tokens:
            raise ShapeError(
                f"{self.__struct_config__.tag} takes values, but its input is token ids (embed them first)"
            )
        return ins.dims


class Linear(LayerSpec, frozen=True, kw_only=True, tag="linear"):
    """``nn.Linear`` on the last dimension."""

    out: Dim
    bias: bool = True

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        n_in = dims[-1]
        out = (*dims[:-1], self.out)
        positions = _numel(dims[:-1])
        params = n_in * self.out + (self.out if self.bias else 0)
        return Sig(out), Cost(params, _numel(out), 2 * n_in * self.out * positions)


def _slide(
    layer: LayerSpec, dims: tuple[int, ...], spatial: int, kernel: int, stride: int, padding: int
) -> tuple[int, ...]:
    """The sides a window of ``kernel`` sliding by ``stride`` over (C, L) or (C, H, W) leaves (a
    convolution's or a pooling's); ``ShapeError`` where the input has other dimensions or is too small."""
    tag = layer.__struct_config__.tag
    if len(dims) != spatial + 1:
        raise ShapeError(f"{tag} takes (C{', L' if spatial == 1 else ', H, W'}), got {list(dims)}")
    new = tuple((s + 2 * padding - kernel) // stride + 1 for s in dims[1:])
    if any(s < 1 for s in new):
        raise ShapeError(f"{tag} kernel {kernel} does not fit its input {list(dims)}")
    return new


class _Conv(LayerSpec, frozen=True, kw_only=True):
    out: Dim
    kernel: Kernel = 3
    stride: Stride = 1
    padding: Padding = 0
    spatial: int = 0

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        new = _slide(self, dims, self.spatial, self.kernel, self.stride, self.padding)
        window = dims[0] * self.kernel**self.spatial
        out = (self.out, *new)
        return Sig(out), Cost(window * self.out + self.out, _numel(out), 2 * window * _numel(out))


class Conv1d(_Conv, frozen=True, kw_only=True, tag="conv1d"):
    """``nn.Conv1d`` on (C, L)."""

    spatial: int = 1


class Conv2d(_Conv, frozen=True, kw_only=True, tag="conv2d"):
    """``nn.Conv2d`` on (C, H, W)."""

    spatial: int = 2


class BatchNorm(LayerSpec, frozen=True, kw_only=True, tag="batchnorm"):
    """``nn.BatchNorm1d`` on (C,) or (C, L), ``nn.BatchNorm2d`` on (C, H, W): over the channels."""

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        if len(dims) > 3:
            raise ShapeError(f"batchnorm takes (C,), (C, L) or (C, H, W), got {list(dims)}")
        return Sig(dims), Cost(2 * dims[0], _numel(dims), 4 * _numel(dims))


class LayerNorm(LayerSpec, frozen=True, kw_only=True, tag="layernorm"):
    """``nn.LayerNorm`` over the last dimension."""

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        return Sig(dims), Cost(2 * dims[-1], _numel(dims), 8 * _numel(dims))


class Dropout(LayerSpec, frozen=True, kw_only=True, tag="dropout"):
    p: Probability = 0.1

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        return Sig(dims), Cost(0, _numel(dims), _numel(dims))


class Embedding(LayerSpec, frozen=True, kw_only=True, tag="embedding"):
    """``nn.Embedding`` of the dataset's vocabulary: token ids (L,) to (L, dim)."""

    dim: Dim

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        if not ins.tokens:
            raise ShapeError("embedding takes token ids: only a text dataset's first layer may be one")
        out = (*ins.dims, self.dim)
        return Sig(out), Cost(vocab * self.dim, _numel(out), 0)


class _Elementwise(LayerSpec, frozen=True, kw_only=True):
    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        return Sig(dims), Cost(0, _numel(dims), 4 * _numel(dims))


class ReLU(_Elementwise, frozen=True, kw_only=True, tag="relu"):
    pass


class GELU(_Elementwise, frozen=True, kw_only=True, tag="gelu"):
    pass


class SiLU(_Elementwise, frozen=True, kw_only=True, tag="silu"):
    pass


class Tanh(_Elementwise, frozen=True, kw_only=True, tag="tanh"):
    pass


class Sigmoid(_Elementwise, frozen=True, kw_only=True, tag="sigmoid"):
    pass


class _Pool(LayerSpec, frozen=True, kw_only=True):
    kernel: Kernel = 2
    stride: Stride | None = None
    """Defaults to ``kernel``."""
    spatial: int = 0

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        new = _slide(self, dims, self.spatial, self.kernel, self.stride or self.kernel, 0)
        out = (dims[0], *new)
        return Sig(out), Cost(0, _numel(out), _numel(out) * self.kernel**self.spatial)


class MaxPool1d(_Pool, frozen=True, kw_only=True, tag="maxpool1d"):
    spatial: int = 1


class MaxPool2d(_Pool, frozen=True, kw_only=True, tag="maxpool2d"):
    spatial: int = 2


class AvgPool1d(_Pool, frozen=True, kw_only=True, tag="avgpool1d"):
    spatial: int = 1


class AvgPool2d(_Pool, frozen=True, kw_only=True, tag="avgpool2d"):
    spatial: int = 2


class GlobalAvgPool(LayerSpec, frozen=True, kw_only=True, tag="global_avg_pool"):
    """The mean over every dimension but the first: (C, L) or (C, H, W) to (C,)."""

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        if len(dims) < 2:
            raise ShapeError(f"global_avg_pool takes (C, L) or (C, H, W), got {list(dims)}")
        return Sig(dims[:1]), Cost(0, dims[0], _numel(dims))


class MeanTokens(LayerSpec, frozen=True, kw_only=True, tag="mean_tokens"):
    """The mean over the sequence: (L, D) to (D,) (an attention stack's pooling)."""

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        if len(dims) != 2:
            raise ShapeError(f"mean_tokens takes (L, D), got {list(dims)}")
        return Sig(dims[1:]), Cost(0, dims[1], _numel(dims))


class Flatten(LayerSpec, frozen=True, kw_only=True, tag="flatten"):
    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        return Sig((_numel(dims),)), Cost()


class Reshape(LayerSpec, frozen=True, kw_only=True, tag="reshape"):
    """To ``shape`` (one sample's, without the batch), holding as many values."""

    shape: ShapeDims

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        if _numel(tuple(self.shape)) != _numel(dims):
            raise ShapeError(
                f"reshape to {self.shape} needs {_numel(tuple(self.shape))} values, "
                f"its input {list(dims)} holds {_numel(dims)}"
            )
        return Sig(tuple(self.shape)), Cost()


class Attention(LayerSpec, frozen=True, kw_only=True, tag="attention"):
    """Multi-head self-attention on (L, D): ``heads`` dividing D, a causal mask where ``causal``."""

    heads: Heads = 1
    causal: bool = False

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        dims = self._values(ins)
        if len(dims) != 2:
            raise ShapeError(f"attention takes (L, D), got {list(dims)}")
        length, d = dims
        if d % self.heads:
            raise ShapeError(f"attention's {self.heads} heads do not divide its width {d}")
        return Sig(dims), Cost(attention_parameters(d), 5 * length * d, attention_flops(length, d))


def attention_parameters(d: int) -> int:
    """One self-attention's: the q, k, v projections and the output projection, with biases."""
    return 4 * d * d + 4 * d


def attention_flops(length: int, d: int) -> int:
    return 2 * 4 * length * d * d + 2 * 2 * length * length * d


class Residual(LayerSpec, frozen=True, kw_only=True, tag="residual"):
    """``x + f(x)`` with ``f`` the block's ``layers``: they must end where they started."""

    layers: Annotated[list[Layer], msgspec.Meta(min_length=1, max_length=MAX_LAYERS_TOTAL)]

    def infer(self, ins: Sig, vocab: int) -> tuple[Sig, Cost]:
        raise AssertionError("a residual block is walked by infer_stack")


Layer = (
    Linear
    | Conv1d
    | Conv2d
    | BatchNorm
    | LayerNorm
    | Dropout
    | Embedding
    | ReLU
    | GELU
    | SiLU
    | Tanh
    | Sigmoid
    | MaxPool1d
    | MaxPool2d
    | AvgPool1d
    | AvgPool2d
    | GlobalAvgPool
    | MeanTokens
    | Flatten
    | Reshape
    | Attention
    | Residual
)
"""One entry of a ``layers`` spec, tagged by ``type``."""

LayerList = Annotated[list[Layer], msgspec.Meta(min_length=1, max_length=MAX_LAYERS_TOTAL)]


def infer_stack(layers: list[Layer], ins: Sig, vocab: int, *, prefix: str = "", depth: int = 0) -> tuple[Sig, Cost]:
    """Walk ``layers`` from ``ins``: the output shape and the stack's total cost; ``ShapeError``
    naming the first layer that does not fit."""
    if depth > MAX_NESTING:
        raise ShapeError(f"layer {prefix.rstrip('.')}: residual blocks nested deeper than {MAX_NESTING}")
    total = Cost()
    sig = ins
    for i, layer in enumerate(layers):
        where = f"{prefix}{i}"
        if isinstance(layer, Residual):
            out, cost = infer_stack(layer.layers, sig, vocab, prefix=f"{where}.", depth=depth + 1)
            if out != sig:
                raise ShapeError(
                    f"layer {where}: a residual block must end in its input's shape {list(sig.dims)}, "
                    f"not {list(out.dims)}"
                )
            cost = cost + Cost(0, _numel(sig.dims), _numel(sig.dims))
        else:
            try:
                out, cost = layer.infer(sig, vocab)
            except ShapeError as exc:
                raise ShapeError(f"layer {where} ({layer.__struct_config__.tag}): {exc}") from None
        if _numel(out.dims) > MAX_ACTIVATION:
            raise ShapeError(
                f"layer {where}: its output of {_numel(out.dims):,} values per sample is over {MAX_ACTIVATION:,}"
            )
        sig, total = out, total + cost
    return sig, total


def count_layers(layers: list[Layer]) -> int:
    return sum(1 + (count_layers(layer.layers) if isinstance(layer, Residual) else 0) for layer in layers)
