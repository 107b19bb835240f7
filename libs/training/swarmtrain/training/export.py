"""A finished model for serving: ``load`` (the public ``swarmtrain.load_model``) rebuilds the
``torch.nn.Module`` from a downloaded model file alone (safetensors, its spec in the metadata,
nothing unpickled), and ``to_onnx`` writes it as an ONNX graph with a dynamic batch axis.

The ONNX model's input is ``input``: float32 ``(batch, features)`` rows (the standardization is
inside), or int64 ``(batch, context)`` token ids for a model of tokens; its output ``output``: the
logits ``(batch, classes)``, or ``(batch, context, vocab)`` for a language model."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from swarmtrain.common.models import LayersSpec, TransformerSpec
from swarmtrain.training.model import ModelMetadata, load_model

ONNX_OPSET = 18


def load(path: str | Path | bytes) -> nn.Module:
    """The model a swarmtrain model file holds (a path or its bytes), in eval mode on the CPU."""
    model, _ = load_model(path if isinstance(path, bytes) else Path(path))
    return model


def example_input(metadata: ModelMetadata, batch: int = 2) -> torch.Tensor:
    """An input of the model's shape: rows of values, or token ids for a model of tokens."""
    spec, shape = metadata.spec(), metadata.data_shape()
    if spec.takes_tokens(shape):
        assert isinstance(spec, TransformerSpec | LayersSpec)
        return torch.zeros(batch, spec.context, dtype=torch.long)
    return torch.zeros(batch, shape.features)


def to_onnx(source: str | Path | bytes, out: Path) -> ModelMetadata:
    """Write the model file ``source`` as ONNX to ``out``; its metadata back."""
    model, metadata = load_model(source if isinstance(source, bytes) else Path(source))
    x = example_input(metadata)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on optional packages (torchvision) are not the caller's
    try:
        with warnings.catch_warnings():  # nor are the exporter's own deprecation notices
            warnings.simplefilter("ignore")
            _export(model, x, out)
    finally:
        quiet.setLevel(level)
    return metadata


def _export(model: nn.Module, x: torch.Tensor, out: Path) -> None:
    torch.onnx.export(
        model,
        (x,),
        str(out),
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},),
        opset_version=ONNX_OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
