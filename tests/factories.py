"""Events with sensible defaults for tests: override only what a test is about."""

from __future__ import annotations

from typing import Any

from swarmtrain.common.events import Hyperparameters, ModelSpec, SessionRequested

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)


def session_requested(
    session_id: str = "s1", num_peers: int = 1, hyperparameters: Hyperparameters = HP, **fields: Any
) -> SessionRequested:
    values: dict[str, Any] = {
        "session_id": session_id,
        "owner_id": "u",
        "dataset_id": "d",
        "dataset_uri": "file:///d.csv",
        "dataset_sha256": "0",
        "label_column": "label",
        "num_peers": num_peers,
        "model": ModelSpec(),
        "hyperparameters": [hyperparameters] * num_peers,
    }
    return SessionRequested(**{**values, **fields})
