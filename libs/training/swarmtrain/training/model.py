"""A model (``Standardize``, then the layers its kind builds: ``training.models``) and its
safetensors file: self-contained (standardization inside), never pickled, and written byte-for-byte
deterministically. Nothing here names a kind."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Final, get_args

import msgspec
import torch
from safetensors.torch import load_file
from torch import nn

from swarmtrain.common.events import CLASSIFICATION, Task
from swarmtrain.common.models import KINDS, DataShape, ModelSpec
from swarmtrain.training import tasks, tensorfile
from swarmtrain.training.models import build_layers

MIN_STD = 1e-6
FORMAT = "swarmtrain-mlp/1"
ORIGINAL_KIND = "mlp"
"""The kind of every model file before files said their kind: one without ``kind`` is an mlp."""


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training split's statistics kept as buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Take mean and std from ``x``; a (near-)constant feature gets std 1."""
        mean = x.mean(dim=0)
        std = x.std(dim=0, correction=0)
        std = torch.where(std < MIN_STD, torch.ones_like(std), std)
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_model(spec: ModelSpec, n_features: int, n_classes: int, shape: DataShape | None = None) -> nn.Sequential:
    """``Standardize``, then the layers ``spec``'s kind builds (``training.models.<kind>``), ending
    in the task's outputs (``n_classes`` logits for a classification, 1 for a regression), then the
    task's head (a regression's ``Rescale``); a model of token ids (a transformer, layers on text)
    has no ``Standardize``. ``shape``: the data's, where it says more than its features and classes (an
    image, a vocabulary, a task). A spec that cannot be built on this data raises ``ShapeError``
    (a ``ValueError``) with the reason.

    Built from torch's global generator: seed it first for reproducible initial weights.
    """
    shape = shape or DataShape(features=n_features, classes=n_classes)
    learns = tasks.task(shape.task)
    shape = dataclasses.replace(shape, classes=learns.outputs(shape.classes))
    layers = [*build_layers(spec, shape), *learns.head()]
    if spec.takes_tokens(shape):
        return nn.Sequential(*layers)
    return nn.Sequential(Standardize(shape.features), *layers)


DEFAULT_SHAPE: Final = DataShape(features=0, classes=0)
CLASSIC_KINDS: Final = ("mlp", "cnn")
"""Kinds whose files never carried a data shape (so their files are as they always were)."""


def shape_strings(spec: ModelSpec, shape: DataShape) -> dict[str, str]:
    """The data shape's extras a model file carries (``task``, ``vocab``, ``image``): none for an
    mlp or cnn of classification on values (an image's included), as their files always were."""
    extras = {"task": shape.task, "vocab": shape.vocab, "image": list(shape.image) if shape.image else None}
    default = {"task": DEFAULT_SHAPE.task, "vocab": DEFAULT_SHAPE.vocab, "image": None}
    if spec.kind in CLASSIC_KINDS and extras["task"] == default["task"] and extras["vocab"] == default["vocab"]:
        return {}  # an mlp or cnn reads no image from it
    return {"data_shape": json.dumps(extras)}


class ModelMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """What a reader needs besides the tensors: stored as the safetensors header's string map.

    Holds nothing about who trained the model or when, so equal weights make equal files. The spec
    is stored field by field (each JSON), with ``kind`` beside them except for an mlp: so an mlp's
    file is as it always was, and every kind's is read back by the same two functions.
    """

    classes: list[str]
    feature_names: list[str]
    label_column: str
    model: ModelSpec
    task: Task = CLASSIFICATION
    """What the model predicts; a classifier's file carries no ``task`` (as files always were)."""
    vocab: int = 0
    image: tuple[int, int, int] | None = None

    @classmethod
    def for_spec(
        cls,
        spec: ModelSpec,
        *,
        classes: list[str],
        feature_names: list[str],
        label_column: str,
        task: Task = CLASSIFICATION,
        shape: DataShape | None = None,
    ) -> ModelMetadata:
        """``shape``, where given, says the task (over ``task``), a vocabulary and an image."""
        meta = cls(classes=classes, feature_names=feature_names, label_column=label_column, model=spec, task=task)
        if shape is None:
            return meta
        task_of = next(t for t in get_args(Task) if t == shape.task)
        return msgspec.structs.replace(meta, task=task_of, vocab=shape.vocab, image=shape.image)

    def data_shape(self) -> DataShape:
        """The shape the model was built on (``build_model`` rebuilds it from this)."""
        return DataShape(
            features=len(self.feature_names),
            classes=len(self.classes),
            task=self.task,
            vocab=self.vocab,
            image=self.image,
        )

    def spec(self) -> ModelSpec:
        return self.model

    def to_strings(self) -> dict[str, str]:
        out = {
            "format": FORMAT,
            "classes": json.dumps(self.classes),
            "feature_names": json.dumps(self.feature_names),
            "label_column": self.label_column,
        }
        if self.task != CLASSIFICATION:
            out["task"] = self.task
        fields = msgspec.to_builtins(self.model)
        kind = fields.pop("kind")
        if kind != ORIGINAL_KIND:  # the original kind's file carries no kind
            out["kind"] = kind
        out |= shape_strings(self.model, self.data_shape())
        return out | {name: json.dumps(value) for name, value in fields.items()}

    @classmethod
    def from_strings(cls, meta: dict[str, str] | None) -> ModelMetadata:
        if not meta or meta.get("format") != FORMAT:
            raise ValueError("not a swarmtrain model file (missing or unknown format metadata)")
        kind = meta.get("kind", ORIGINAL_KIND)
        fields = KINDS.get(kind).__struct_fields__
        raw: dict[str, object] = {
            "classes": json.loads(meta["classes"]),
            "feature_names": json.loads(meta["feature_names"]),
            "label_column": meta["label_column"],
            "task": meta.get("task", CLASSIFICATION),
            "model": {"kind": kind} | {name: json.loads(meta[name]) for name in fields if name in meta},
        }
        if "data_shape" in meta:
            raw |= json.loads(meta["data_shape"])
        return msgspec.convert(raw, cls)


def model_bytes(model: nn.Module, metadata: ModelMetadata) -> bytes:
    """The model file's bytes: its state (on CPU) and ``metadata``; equal weights give equal bytes."""
    return tensorfile.dumps(model.state_dict(), metadata.to_strings())


def save_model(model: nn.Module, path: Path, metadata: ModelMetadata) -> None:
    """Write the model's state (on CPU) and ``metadata`` as one safetensors file."""
    path.write_bytes(model_bytes(model, metadata))


def load_model(source: Path | bytes) -> tuple[nn.Sequential, ModelMetadata]:
    """Rebuild a model saved by ``save_model`` (from a path or the file's bytes), in eval mode on CPU."""
    if isinstance(source, bytes):
        metadata = ModelMetadata.from_strings(tensorfile.read_metadata(source))
        tensors = tensorfile.loads(source)
    else:
        with source.open("rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            metadata = ModelMetadata.from_strings(tensorfile.read_metadata(head + f.read(n)))
        tensors = load_file(str(source), device="cpu")
    model = build_model(metadata.spec(), len(metadata.feature_names), len(metadata.classes), metadata.data_shape())
    model.load_state_dict(tensors, strict=True)
    return model.eval(), metadata
