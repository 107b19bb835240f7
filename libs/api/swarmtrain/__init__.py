"""swarmtrain: train models on a swarm of peer machines.

The one public function of the package itself is :func:`load_model`; everything else lives in its
parts (``swarmtrain.common``, ``swarmtrain.training``, the services). Importing ``swarmtrain`` loads
nothing more (no torch): a service that imports ``swarmtrain.common`` pays nothing for it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = ["load_model"]


def load_model(path: str | Path | bytes) -> Any:
    """The ``torch.nn.Module`` a downloaded swarmtrain model file holds (``swarmtrain sessions
    download``, or ``GET /sessions/{id}/model``), rebuilt from the file alone: the spec is in its
    safetensors metadata, nothing is unpickled. In eval mode, on the CPU, ready to call on a batch:
    rows of feature values ``(batch, features)`` (standardized inside), or token ids
    ``(batch, context)`` for a transformer; it returns the logits."""
    export = importlib.import_module("swarmtrain.training.export")  # torch only when called
    return export.load(path)
