"""The models (an MLP, a small CNN) and their safetensors file: self-contained (standardization
inside), never pickled, and written byte-for-byte deterministically."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import get_args

import msgspec
import torch
from safetensors.torch import load_file
from torch import nn

from swarmtrain.common import shapes
from swarmtrain.common.events import ModelKind, ModelSpec
from swarmtrain.training import tensorfile

MIN_STD = 1e-6
FORMAT = "swarmtrain-mlp/1"


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


def build_model(spec: ModelSpec, n_features: int, n_classes: int) -> nn.Sequential:
    """``Standardize``, then the body ``spec.kind`` names, then ``n_classes`` logits.

    - ``mlp``: Linear layers of ``spec.hidden`` sizes with ReLU between.
    - ``cnn``: the features reshaped to ``spec.input_shape`` ``[C, H, W]``; the convolutions
      ``shapes.conv_layers`` lists (3x3 with padding 1, ReLU, then a 2x2 max-pool where it says);
      flattened; then Linear layers of ``spec.hidden`` sizes with ReLU.

    Built from torch's global generator: seed it first for reproducible initial weights.
    """
    if spec.kind not in get_args(ModelKind):
        raise ValueError(f"unsupported model kind {spec.kind!r}")
    if n_features < 1 or n_classes < 1 or any(h < 1 for h in spec.hidden):
        raise ValueError(f"bad model shape: {n_features} features, hidden {spec.hidden}, {n_classes} classes")
    layers: list[nn.Module] = [Standardize(n_features)]
    convs, flat = shapes.conv_layers(spec, n_features)
    if convs:
        layers.append(nn.Unflatten(1, tuple(shapes.cnn_input(spec, n_features))))
        for conv in convs:
            layers += [
                nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=shapes.KERNEL, padding=shapes.KERNEL // 2),
                nn.ReLU(),
            ]
            if conv.pool:
                layers.append(nn.MaxPool2d(shapes.POOL))
        layers.append(nn.Flatten())
    linears = shapes.linear_widths(spec, flat, n_classes)
    for n_in, n_out in linears[:-1]:
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    layers.append(nn.Linear(*linears[-1]))
    return nn.Sequential(*layers)


class ModelMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """What a reader needs besides the tensors: stored as the safetensors header's string map.

    Holds nothing about who trained the model or when, so equal weights make equal files.
    """

    classes: list[str]
    feature_names: list[str]
    label_column: str
    hidden: list[int]
    kind: str = "mlp"
    input_shape: list[int] | None = None
    """cnn only."""
    channels: list[int] = msgspec.field(default_factory=list)
    """cnn only."""

    @classmethod
    def for_spec(
        cls, spec: ModelSpec, *, classes: list[str], feature_names: list[str], label_column: str
    ) -> ModelMetadata:
        cnn = spec.kind == "cnn"
        return cls(
            classes=classes,
            feature_names=feature_names,
            label_column=label_column,
            hidden=list(spec.hidden),
            kind=spec.kind,
            input_shape=list(spec.input_shape) if cnn and spec.input_shape is not None else None,
            channels=list(spec.channels) if cnn else [],
        )

    def spec(self) -> ModelSpec:
        if self.kind == "cnn":
            return ModelSpec(kind="cnn", hidden=list(self.hidden), input_shape=self.input_shape, channels=self.channels)
        return ModelSpec(kind="mlp", hidden=list(self.hidden))

    def to_strings(self) -> dict[str, str]:
        out = {
            "format": FORMAT,
            "classes": json.dumps(self.classes),
            "feature_names": json.dumps(self.feature_names),
            "label_column": self.label_column,
            "hidden": json.dumps(self.hidden),
        }
        if self.kind != "mlp":  # an MLP's file is as it always was
            out |= {
                "kind": self.kind,
                "input_shape": json.dumps(self.input_shape),
                "channels": json.dumps(self.channels),
            }
        return out

    @classmethod
    def from_strings(cls, meta: dict[str, str] | None) -> ModelMetadata:
        if not meta or meta.get("format") != FORMAT:
            raise ValueError("not a swarmtrain model file (missing or unknown format metadata)")
        raw: dict[str, object] = {
            "classes": json.loads(meta["classes"]),
            "feature_names": json.loads(meta["feature_names"]),
            "label_column": meta["label_column"],
            "hidden": json.loads(meta["hidden"]),
            "kind": meta.get("kind", "mlp"),
        }
        if raw["kind"] != "mlp":
            raw |= {"input_shape": json.loads(meta["input_shape"]), "channels": json.loads(meta["channels"])}
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
    model = build_model(metadata.spec(), len(metadata.feature_names), len(metadata.classes))
    model.load_state_dict(tensors, strict=True)
    return model.eval(), metadata
