"""The MLP and its safetensors file: self-contained (standardization inside), never pickled."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import msgspec
import torch
from safetensors.torch import load as load_tensors_bytes
from safetensors.torch import load_file, save_file
from torch import nn

from swarmtrain.common.events import ModelSpec

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
    """``Standardize`` then Linear layers of ``spec.hidden`` sizes with ReLU between, ``n_classes`` logits."""
    if spec.kind != "mlp":
        raise ValueError(f"unsupported model kind {spec.kind!r}")
    if n_features < 1 or n_classes < 1 or any(h < 1 for h in spec.hidden):
        raise ValueError(f"bad model shape: {n_features} features, hidden {spec.hidden}, {n_classes} classes")
    layers: list[nn.Module] = [Standardize(n_features)]
    width = n_features
    for h in spec.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


class ModelMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """What a reader needs besides the tensors: stored as the safetensors header's string map."""

    classes: list[str]
    feature_names: list[str]
    label_column: str
    hidden: list[int]

    def to_strings(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "classes": json.dumps(self.classes),
            "feature_names": json.dumps(self.feature_names),
            "label_column": self.label_column,
            "hidden": json.dumps(self.hidden),
        }

    @classmethod
    def from_strings(cls, meta: dict[str, str] | None) -> ModelMetadata:
        if not meta or meta.get("format") != FORMAT:
            raise ValueError("not a swarmtrain model file (missing or unknown format metadata)")
        return msgspec.convert(
            {
                "classes": json.loads(meta["classes"]),
                "feature_names": json.loads(meta["feature_names"]),
                "label_column": meta["label_column"],
                "hidden": json.loads(meta["hidden"]),
            },
            cls,
        )


def save_model(model: nn.Module, path: Path, metadata: ModelMetadata) -> None:
    """Write the model's state (on CPU) and ``metadata`` as one safetensors file."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata.to_strings())


def _header_metadata(data: bytes) -> dict[str, str] | None:
    # safetensors layout: u64 little-endian header length, then the JSON header.
    if len(data) < 8:
        raise ValueError("not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__")
    return dict(meta) if isinstance(meta, dict) else None


def load_model(source: Path | bytes) -> tuple[nn.Sequential, ModelMetadata]:
    """Rebuild a model saved by ``save_model`` (from a path or the file's bytes), in eval mode on CPU."""
    if isinstance(source, bytes):
        metadata = ModelMetadata.from_strings(_header_metadata(source))
        tensors = load_tensors_bytes(source)
    else:
        with source.open("rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            metadata = ModelMetadata.from_strings(_header_metadata(head + f.read(n)))
        tensors = load_file(str(source), device="cpu")
    model = build_model(ModelSpec(hidden=list(metadata.hidden)), len(metadata.feature_names), len(metadata.classes))
    model.load_state_dict(tensors, strict=True)
    return model.eval(), metadata
