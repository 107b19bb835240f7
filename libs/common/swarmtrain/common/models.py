"""The model kinds of the contract: one msgspec Struct per kind in the tagged union ``ModelSpec``
(tag field ``kind``), each with its static facts, pure arithmetic with no torch.

Everyone reads a kind's facts here and never compares a kind's name: the gateway checks a request
(:meth:`ModelKindSpec.check`: a reason for a 400) and caps its size
(:meth:`ModelKindSpec.parameter_count`), the scheduler places by that size, the peer builds the
layers the same facts describe (``swarmtrain.training.models.<kind>``, registered in
``training.models.MODELS``), and the CLI and the dashboard offer :data:`KINDS`' names.

Adding a kind (``resnet``, ``transformer``, ``layers``): its Struct here (``tag="<kind>"``, its
fields with bounds and defaults, ``check`` and ``parameter_count``), its name in ``ModelKind``, the
Struct in ``ModelSpec`` and ``KINDS.add``; then one module ``libs/training/swarmtrain/training/
models/<kind>.py`` with ``@MODELS.register("<kind>")`` on its builder, imported in that package's
``__init__``, and its test ``tests/training/test_model_<kind>.py``. A field name two kinds share
must have one type (the REST input takes every kind's fields flat; checked at import).

Stored history: events written before the union carry ``{"kind": "mlp", "hidden": [...],
"input_shape": null, "channels": [...]}`` (an mlp decodes ignoring the cnn's fields) or no
``kind`` at all (``events.upcast`` adds ``"mlp"``); an mlp's model file is as it always was.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal, Union, get_args

import msgspec

from swarmtrain.common.layers import MAX_LAYERS_TOTAL, Cost, Layer, LayerList, Sig, count_layers, infer_stack
from swarmtrain.common.registry import Registry
from swarmtrain.common.shapes import ShapeError

MAX_WIDTH: Final = 1 << 16
MAX_LAYERS: Final = 32
Width = Annotated[int, msgspec.Meta(ge=1, le=MAX_WIDTH)]
"""A layer's units, a convolution's channels, one side of an input shape."""
Widths = Annotated[list[Width], msgspec.Meta(max_length=MAX_LAYERS)]
Channels = Annotated[list[Width], msgspec.Meta(min_length=1, max_length=MAX_LAYERS)]
InputShape = Annotated[list[Width], msgspec.Meta(min_length=3, max_length=3)]
"""[C, H, W]."""

DEFAULT_HIDDEN: Final = (128, 64)
DEFAULT_CHANNELS: Final = (16, 32)


@dataclass(frozen=True, slots=True)
class DataShape:
    """What a model's layers depend on besides its spec: the dataset's shape, as its
    ``DatasetUploaded`` states it. A data format with more to say (an image's CxHxW, a vocabulary)
    adds a field here with a default, and the kinds that need it read it."""

    features: int
    """Values per row (the columns besides the label); a text dataset's: its windows' length."""
    classes: int
    """Output logits (a regression's: 1, a ``(batch, 1)`` output)."""
    task: str = "classification"
    """``classification`` | ``regression`` | ``language_modeling`` (a causal model of ``vocab`` logits)."""
    vocab: int = 0
    """A text dataset's vocabulary (its rows are token ids); 0: its rows are values."""
    image: tuple[int, int, int] | None = None
    """An image dataset's [C, H, W] (its ``features`` columns are those pixels, flat)."""

    @property
    def tokens(self) -> bool:
        """Whether a row is token ids (a model embeds them; nothing standardizes them)."""
        return self.vocab > 0


@dataclass(frozen=True, slots=True)
class Costs:
    """A model's size on a dataset, from its spec alone: what the gateway, placement and the peer read."""

    parameters: int
    activations: int
    """Values per sample the forward pass keeps for the backward one (an estimate: each layer's output)."""
    flops: int
    """Forward floating-point operations per sample (a multiply-add is 2); training is about 3x."""

    def training_bytes(self, batch_size: int) -> int:
        """Memory a training step needs, estimated: float32 weights, gradients and two Adam moments
        (16 bytes a parameter), and the activations and their gradients for ``batch_size`` samples."""
        return 16 * self.parameters + 8 * self.activations * batch_size


class ModelKindSpec(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """What every kind's spec answers; a kind is a subclass with ``tag="<kind>"``."""

    needs: ClassVar[tuple[str, ...]] = ()
    """Fields a request must give for this kind (no default makes sense): a 400 names the first missing."""

    @property
    def kind(self) -> str:
        """The kind's name: its tag in the union."""
        tag = self.__struct_config__.tag
        assert isinstance(tag, str)
        return tag

    def check(self, shape: DataShape) -> None:
        """Raise ``ShapeError`` (a reason fit for a 400) unless this spec can be built on data of ``shape``."""
        raise NotImplementedError

    def parameter_count(self, shape: DataShape) -> int:
        """Trainable parameters of the model the peers build for this spec on data of ``shape``
        (``check`` first: it raises ``ShapeError`` for a spec that cannot be built)."""
        return self.costs(shape).parameters

    def costs(self, shape: DataShape) -> Costs:
        """Parameters, activations and FLOPs per sample on data of ``shape`` (``ShapeError`` where it
        cannot be built)."""
        raise NotImplementedError

    def takes_tokens(self, shape: DataShape) -> bool:
        """Whether the model's input is token ids (no ``Standardize`` in front)."""
        return False


def linear_widths(hidden: list[int], flat: int, classes: int) -> list[tuple[int, int]]:
    """The fully connected layers' ``(in, out)``: ``flat`` inputs, ``hidden``, then ``classes`` logits."""
    return list(itertools.pairwise([flat, *hidden, classes]))


def linear_parameters(hidden: list[int], flat: int, classes: int) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in linear_widths(hidden, flat, classes))


def _check_values(kind: str, shape: DataShape) -> None:
    if shape.tokens or shape.task == "language_modeling":
        raise ShapeError(
            f"a {kind} takes rows of values, not text: use a transformer or layers starting with an embedding"
        )


def _dense_costs(hidden: list[int], flat: int, classes: int, before: Costs) -> Costs:
    widths = linear_widths(hidden, flat, classes)
    params = before.parameters + sum(a * b + b for a, b in widths)
    activations = before.activations + sum(2 * b for _, b in widths)
    flops = before.flops + sum(2 * a * b for a, b in widths)
    return Costs(params, activations, flops)


def _check_dense(hidden: list[int], shape: DataShape) -> None:
    if shape.features < 1 or shape.classes < 1 or any(h < 1 for h in hidden):
        raise ShapeError(f"bad model shape: {shape.features} features, hidden {hidden}, {shape.classes} classes")


# ------------------------------------------------------------------ mlp


class MlpSpec(ModelKindSpec, frozen=True, kw_only=True, tag="mlp"):
    """Linear layers of ``hidden`` sizes with ReLU between, then the logits."""

    hidden: Widths = msgspec.field(default_factory=lambda: list(DEFAULT_HIDDEN))
    """Fully connected layer widths."""

    def check(self, shape: DataShape) -> None:
        _check_dense(self.hidden, shape)
        _check_values(self.kind, shape)

    def parameter_count(self, shape: DataShape) -> int:
        self.check(shape)
        return linear_parameters(self.hidden, shape.features, shape.classes)

    def costs(self, shape: DataShape) -> Costs:
        self.check(shape)
        return _dense_costs(self.hidden, shape.features, shape.classes, Costs(0, shape.features, 2 * shape.features))


# ------------------------------------------------------------------ cnn

KERNEL: Final = 3
"""A cnn's convolutions are KERNELxKERNEL with padding KERNEL // 2, so they keep height and width."""
POOL: Final = 2
"""After each convolution, a POOLxPOOL max-pool while the image is at least POOLxPOOL."""


@dataclass(frozen=True, slots=True)
class ConvLayer:
    in_channels: int
    out_channels: int
    pool: bool
    """Whether a max-pool follows (the image entering it is at least POOLxPOOL)."""


class CnnSpec(ModelKindSpec, frozen=True, kw_only=True, tag="cnn"):
    """The features reshaped to ``input_shape`` [C, H, W]; per ``channels`` a 3x3 convolution
    (padding 1), ReLU, and a 2x2 max-pool while the image is at least 2x2; flattened; then linear
    layers of ``hidden`` sizes with ReLU, then the logits."""

    needs: ClassVar[tuple[str, ...]] = ("input_shape",)
    hidden: Widths = msgspec.field(default_factory=lambda: list(DEFAULT_HIDDEN))
    """Fully connected layer widths, after the convolutions."""
    input_shape: InputShape | None = None
    """[C, H, W] of image data given as flat pixel columns (C*H*W = features); a request must give it."""
    channels: Channels = msgspec.field(default_factory=lambda: list(DEFAULT_CHANNELS))
    """The convolutions' widths."""

    def image(self, shape: DataShape) -> tuple[int, int, int]:
        """``[C, H, W]``, checked against the data's ``features`` columns."""
        dims = self.input_shape
        if dims is None or len(dims) != 3 or any(d < 1 for d in dims):
            raise ShapeError(f"a cnn needs input_shape [C, H, W] of positive sizes, got {dims}")
        c, h, w = dims
        if c * h * w != shape.features:
            raise ShapeError(
                f"input_shape {c}x{h}x{w} holds {c * h * w} values but the data has {shape.features} feature columns"
            )
        if not self.channels or any(out < 1 for out in self.channels):
            raise ShapeError(f"a cnn needs at least one positive channel width, got {self.channels}")
        return c, h, w

    def conv_layers(self, shape: DataShape) -> tuple[list[ConvLayer], int]:
        """The convolutions, and the width of what they flatten to."""
        c, h, w = self.image(shape)
        layers = []
        for out in self.channels:
            pool = h >= POOL and w >= POOL
            layers.append(ConvLayer(in_channels=c, out_channels=out, pool=pool))
            if pool:
                h, w = h // POOL, w // POOL
            c = out
        return layers, c * h * w

    def check(self, shape: DataShape) -> None:
        _check_dense(self.hidden, shape)
        _check_values(self.kind, shape)
        self.image(shape)

    def parameter_count(self, shape: DataShape) -> int:
        self.check(shape)
        convs, flat = self.conv_layers(shape)
        total = sum(KERNEL * KERNEL * conv.in_channels * conv.out_channels + conv.out_channels for conv in convs)
        return total + linear_parameters(self.hidden, flat, shape.classes)

    def costs(self, shape: DataShape) -> Costs:
        self.check(shape)
        _, h, w = self.image(shape)
        convs, flat = self.conv_layers(shape)
        params, activations, flops = 0, 2 * shape.features, 2 * shape.features
        for conv in convs:
            window = KERNEL * KERNEL * conv.in_channels
            params += window * conv.out_channels + conv.out_channels
            activations += 2 * conv.out_channels * h * w
            flops += 2 * window * conv.out_channels * h * w
            if conv.pool:
                h, w = h // POOL, w // POOL
                activations += conv.out_channels * h * w
        return _dense_costs(self.hidden, flat, shape.classes, Costs(params, activations, flops))


# ------------------------------------------------------------------ resnet


def _image(kind: str, input_shape: list[int] | None, shape: DataShape) -> tuple[int, int, int]:
    """The image a row holds: ``input_shape`` where given, else the dataset's own [C, H, W]."""
    dims = tuple(input_shape) if input_shape is not None else shape.image
    if dims is None or len(dims) != 3 or any(d < 1 for d in dims):
        raise ShapeError(f"a {kind} needs image data: an images dataset, or input_shape [C, H, W]; got {dims}")
    c, h, w = dims
    if c * h * w != shape.features:
        raise ShapeError(
            f"input_shape {c}x{h}x{w} holds {c * h * w} values but the data has {shape.features} feature columns"
        )
    return c, h, w


@dataclass(frozen=True, slots=True)
class BasicBlock:
    in_channels: int
    out_channels: int
    stride: int

    @property
    def projects(self) -> bool:
        """Whether the shortcut is a 1x1 convolution with batch norm (the shape changes)."""
        return self.stride != 1 or self.in_channels != self.out_channels


class ResnetSpec(ModelKindSpec, frozen=True, kw_only=True, tag="resnet"):
    """A ResNet of basic blocks for images: a 3x3 convolution to ``width`` channels with batch norm
    and ReLU; ``stages`` stages of ``depth`` basic blocks each (two 3x3 convolutions with batch norm,
    a shortcut that is a 1x1 convolution with batch norm where the shape changes), the channels
    doubling and the image halving (stride 2) at each stage after the first while it is at least
    2x2; a global average pool; the logits."""

    depth: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2
    """Basic blocks per stage."""
    width: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    """The first stage's channels."""
    stages: Annotated[int, msgspec.Meta(ge=1, le=4)] = 3
    input_shape: InputShape | None = None
    """[C, H, W]; unset: the images dataset's own."""

    def blocks(self, shape: DataShape) -> tuple[list[BasicBlock], tuple[int, int, int]]:
        """The basic blocks in order, and the ``(channels, H, W)`` they end in."""
        _, h, w = _image(self.kind, self.input_shape, shape)
        blocks, c = [], self.width
        for stage in range(self.stages):
            out = self.width << stage
            for i in range(self.depth):
                stride = 2 if stage > 0 and i == 0 and h >= 2 and w >= 2 else 1
                blocks.append(BasicBlock(c, out, stride))
                if stride == 2:
                    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
                c = out
        return blocks, (c, h, w)

    def check(self, shape: DataShape) -> None:
        _check_values(self.kind, shape)
        if shape.classes < 1:
            raise ShapeError(f"bad model shape: {shape.classes} classes")
        _image(self.kind, self.input_shape, shape)

    def costs(self, shape: DataShape) -> Costs:
        self.check(shape)
        c, h, w = _image(self.kind, self.input_shape, shape)
        params = 9 * c * self.width + 2 * self.width
        activations = 2 * shape.features + 3 * self.width * h * w
        flops = 2 * 9 * c * self.width * h * w
        for block in self.blocks(shape)[0]:
            if block.stride == 2:
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            cin, cout, area = block.in_channels, block.out_channels, h * w
            params += 9 * cin * cout + 9 * cout * cout + 4 * cout
            flops += 2 * 9 * (cin + cout) * cout * area
            activations += 6 * cout * area
            if block.projects:
                params += cin * cout + 2 * cout
                flops += 2 * cin * cout * area
                activations += 2 * cout * area
        last = self.width << (self.stages - 1)
        params += last * shape.classes + shape.classes
        flops += 2 * last * h * w + 2 * last * shape.classes
        return Costs(params, activations + last + shape.classes, flops)


# ------------------------------------------------------------------ transformer

Context = Annotated[int, msgspec.Meta(ge=1, le=1 << 14)]
"""Tokens a window holds."""


class TransformerSpec(ModelKindSpec, frozen=True, kw_only=True, tag="transformer"):
    """Token embedding (the text dataset's vocabulary) plus learned or rotary positions; ``layers``
    pre-norm blocks (LayerNorm, multi-head self-attention, residual; LayerNorm, an MLP of
    ``mlp_ratio`` x ``d_model`` with GELU, residual); a final LayerNorm. On a
    ``language_modeling`` dataset a causal decoder whose logits are the embedding's transpose (tied):
    input ``(batch, context)`` token ids, output ``(batch, context, vocab)``; otherwise an encoder
    that mean-pools its tokens into ``classes`` logits: ``(batch, classes)`` (a regression's
    ``(batch, 1)``)."""

    layers: Annotated[int, msgspec.Meta(ge=1, le=48)] = 2
    d_model: Annotated[int, msgspec.Meta(ge=2, le=8192)] = 128
    heads: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    context: Context = 128
    positions: Literal["learned", "rotary"] = "learned"
    mlp_ratio: Annotated[int, msgspec.Meta(ge=1, le=8)] = 4

    def causal(self, shape: DataShape) -> bool:
        return shape.task == "language_modeling"

    def takes_tokens(self, shape: DataShape) -> bool:
        return True

    def check(self, shape: DataShape) -> None:
        if not shape.tokens:
            raise ShapeError("a transformer takes token ids: train it on a text dataset")
        if self.d_model % self.heads:
            raise ShapeError(f"a transformer's heads ({self.heads}) must divide d_model ({self.d_model})")
        if self.positions == "rotary" and (self.d_model // self.heads) % 2:
            raise ShapeError(
                f"rotary positions need an even head width, not d_model / heads = {self.d_model // self.heads}"
            )
        if not self.causal(shape) and shape.classes < 1:
            raise ShapeError(f"bad model shape: {shape.classes} classes")

    def costs(self, shape: DataShape) -> Costs:
        self.check(shape)
        d, n, hidden = self.d_model, self.context, self.mlp_ratio * self.d_model
        block = 4 * d + (4 * d * d + 4 * d) + (d * hidden + hidden + hidden * d + d)
        params = shape.vocab * d + (n * d if self.positions == "learned" else 0) + self.layers * block + 2 * d
        flops = self.layers * (2 * n * (4 * d * d + 2 * d * hidden) + 4 * n * n * d)
        activations = n * d + self.layers * (n * (8 * d + 2 * hidden) + self.heads * n * n)
        if self.causal(shape):
            flops += 2 * n * d * shape.vocab
            activations += n * shape.vocab
        else:
            params += d * shape.classes + shape.classes
            flops += 2 * d * shape.classes
            activations += d + shape.classes
        return Costs(params, activations, flops)


# ------------------------------------------------------------------ layers


class LayersSpec(ModelKindSpec, frozen=True, kw_only=True, tag="layers"):
    """A sequence of allow-listed modules (``common.layers``: linear, conv1d/2d, batchnorm,
    layernorm, dropout, embedding, relu/gelu/silu/tanh/sigmoid, max/avg pooling, global_avg_pool,
    mean_tokens, flatten, reshape, attention with an optional causal mask) and ``residual`` blocks of
    them, each ``{"type": ..., <its arguments>}``. Its input: a table's row ``(features,)``
    (standardized), an image dataset's ``(C, H, W)``, a text dataset's ``(context,)`` token ids (the
    first layer an embedding). It must end in ``(classes,)``, or ``(context, vocab)`` for language
    modelling."""

    needs: ClassVar[tuple[str, ...]] = ("layers",)
    layers: LayerList | None = None
    context: Context = 128
    """A text dataset's window: the token ids a row holds."""

    def _stack(self) -> list[Layer]:
        if not self.layers:
            raise ShapeError("a layers model needs model.layers: a list of at least one layer")
        if (n := count_layers(self.layers)) > MAX_LAYERS_TOTAL:
            raise ShapeError(f"{n} layers: at most {MAX_LAYERS_TOTAL}, residual blocks' contents counted")
        return self.layers

    def takes_tokens(self, shape: DataShape) -> bool:
        return shape.tokens

    def input(self, shape: DataShape) -> Sig:
        if shape.tokens:
            return Sig((self.context,), tokens=True)
        if shape.image is not None and math.prod(shape.image) == shape.features:
            return Sig(shape.image)
        return Sig((shape.features,))

    def output(self, shape: DataShape) -> tuple[int, ...]:
        return (self.context, shape.vocab) if shape.task == "language_modeling" else (shape.classes,)

    def infer(self, shape: DataShape) -> Cost:
        ins = self.input(shape)
        out, cost = infer_stack(self._stack(), ins, shape.vocab)
        if out != Sig(self.output(shape)):
            raise ShapeError(f"the layers end in {list(out.dims)}, but this dataset needs {list(self.output(shape))}")
        return cost

    def check(self, shape: DataShape) -> None:
        self.infer(shape)

    def costs(self, shape: DataShape) -> Costs:
        cost = self.infer(shape)
        ins = self.input(shape)
        standardize = 0 if ins.tokens else 2 * shape.features
        return Costs(cost.parameters, cost.activations + math.prod(ins.dims), cost.flops + standardize)


# ------------------------------------------------------------------ the union and its registry

ModelKind = Literal["mlp", "cnn", "resnet", "transformer", "layers"]
ModelSpec = MlpSpec | CnnSpec | ResnetSpec | TransformerSpec | LayersSpec
"""A model spec: one Struct per kind, tagged by ``kind``."""

KINDS: Registry[type[ModelKindSpec]] = Registry("model kind")
"""Every kind's spec by its name, in the contract's order (what the CLI and the dashboard offer)."""
KINDS.add("mlp", MlpSpec)
KINDS.add("cnn", CnnSpec)
KINDS.add("resnet", ResnetSpec)
KINDS.add("transformer", TransformerSpec)
KINDS.add("layers", LayersSpec)
KINDS.check_names(get_args(ModelKind))
if {KINDS.get(k) for k in KINDS.list()} != set(get_args(ModelSpec)):
    raise ImportError("ModelSpec's members differ from the registered kinds")


def input_fields() -> dict[str, Any]:
    """Every kind's fields by name with their types, ``kind`` aside: what a request may give flat.
    Two kinds may give one name two types only where JSON tells them apart (a transformer's
    ``layers`` count, a layers model's list): the input takes either, the kind's spec checks which;
    otherwise an ``ImportError``."""
    found: dict[str, Any] = {}
    for name in KINDS.list():
        for field in msgspec.structs.fields(KINDS.get(name)):
            typ = field.type
            if (known := found.setdefault(field.name, typ)) != typ:
                merged: Any = Union[known, typ]  # type: ignore[valid-type]  # noqa: UP007 (Annotated members)
                try:
                    msgspec.json.Decoder(merged)
                except TypeError:
                    raise ImportError(f"model field {field.name!r} has two types: {known} and {typ}") from None
                found[field.name] = merged
    return found


INPUT_FIELDS: Final = input_fields()


def from_fields(kind: str, given: dict[str, Any]) -> ModelSpec:
    """The spec a request gives as ``kind`` and the fields it sets (each already of its type);
    ``ShapeError`` for a field of another kind or one the kind needs and lacks."""
    spec_type = KINDS.get(kind)
    own = set(spec_type.__struct_fields__)
    if foreign := [name for name in given if name not in own]:
        others = [k for k in KINDS.list() if foreign[0] in KINDS.get(k).__struct_fields__]
        names = " and ".join(f"model.{name}" for name in foreign)
        verb = "applies" if len(foreign) == 1 else "apply"
        raise ShapeError(f"{names} {verb} to a {' or '.join(others)} only, not to a {kind}")
    if missing := [name for name in spec_type.needs if given.get(name) is None]:
        raise ShapeError(f"a {kind} needs model.{missing[0]}")
    spec: ModelSpec = msgspec.convert({"kind": kind, **given}, ModelSpec, from_attributes=True)
    return spec


def parameter_count(spec: ModelSpec, features: int, classes: int, shape: DataShape | None = None) -> int:
    """``spec.parameter_count`` on ``features`` inputs and ``classes`` outputs (or on ``shape``,
    where the dataset says more: an image, a vocabulary, a task)."""
    return spec.parameter_count(shape or DataShape(features=features, classes=classes))


def data_shape(
    features: int, classes: int, recorded: list[int] | None = None, *, vocab: int = 0, task: str = "classification"
) -> DataShape:
    """A dataset's ``DataShape`` from what its ``DatasetUploaded`` recorded: ``recorded`` its
    ``shape`` (``[C, H, W]`` for images), ``vocab`` a text dataset's vocabulary."""
    image = (recorded[0], recorded[1], recorded[2]) if recorded is not None and len(recorded) == 3 else None
    return DataShape(features=features, classes=classes, task=task, vocab=vocab, image=image)
