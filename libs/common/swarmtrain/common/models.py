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
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal, get_args

import msgspec

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
    """Values per row (the columns besides the label)."""
    classes: int
    """Output logits (1 for a regression; a language model's logits per position: ``vocab``)."""
    task: str = "classification"
    """classification | regression | language_modeling (``events.Task``)."""
    vocab: int = 0
    """language_modeling: the tokenizer's vocabulary; 0 for a task of no tokens."""


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
        raise NotImplementedError


def linear_widths(hidden: list[int], flat: int, classes: int) -> list[tuple[int, int]]:
    """The fully connected layers' ``(in, out)``: ``flat`` inputs, ``hidden``, then ``classes`` logits."""
    return list(itertools.pairwise([flat, *hidden, classes]))


def linear_parameters(hidden: list[int], flat: int, classes: int) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in linear_widths(hidden, flat, classes))


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

    def parameter_count(self, shape: DataShape) -> int:
        self.check(shape)
        return linear_parameters(self.hidden, shape.features, shape.classes)


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
        self.image(shape)

    def parameter_count(self, shape: DataShape) -> int:
        self.check(shape)
        convs, flat = self.conv_layers(shape)
        total = sum(KERNEL * KERNEL * conv.in_channels * conv.out_channels + conv.out_channels for conv in convs)
        return total + linear_parameters(self.hidden, flat, shape.classes)


# ------------------------------------------------------------------ the union and its registry

ModelKind = Literal["mlp", "cnn"]
ModelSpec = MlpSpec | CnnSpec
"""A model spec: one Struct per kind, tagged by ``kind``."""

KINDS: Registry[type[ModelKindSpec]] = Registry("model kind")
"""Every kind's spec by its name, in the contract's order (what the CLI and the dashboard offer)."""
KINDS.add("mlp", MlpSpec)
KINDS.add("cnn", CnnSpec)
KINDS.check_names(get_args(ModelKind))
if {KINDS.get(k) for k in KINDS.list()} != set(get_args(ModelSpec)):
    raise ImportError("ModelSpec's members differ from the registered kinds")


def input_fields() -> dict[str, Any]:
    """Every kind's fields by name with their types, ``kind`` aside: what a request may give flat.
    An ``ImportError`` where two kinds give one name two types."""
    found: dict[str, Any] = {}
    for name in KINDS.list():
        for field in msgspec.structs.fields(KINDS.get(name)):
            if found.setdefault(field.name, field.type) != field.type:
                raise ImportError(f"model field {field.name!r} has two types: {found[field.name]} and {field.type}")
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


def parameter_count(spec: ModelSpec, features: int, classes: int) -> int:
    """``spec.parameter_count`` on ``features`` inputs and ``classes`` outputs."""
    return spec.parameter_count(DataShape(features=features, classes=classes))
