"""Events and REST request bodies with sensible defaults for tests: override only what a test is about."""

from __future__ import annotations

from typing import Any

from swarmtrain.common.events import Hyperparameters, SessionRequested
from swarmtrain.common.fedopts import ROUND_OPTIONS, RoundOptions
from swarmtrain.common.models import MlpSpec

HP = Hyperparameters(epochs=1, batch_size=8, lr=0.01)
Json = dict[str, Any]


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
        "model": MlpSpec(),
        "hyperparameters": [hyperparameters] * num_peers,
    }
    options = {name: fields.pop(name) for name in ROUND_OPTIONS if name in fields}
    if options:  # a round option may be given flat: it goes into round_options
        fields["round_options"] = RoundOptions(**options)
    return SessionRequested(**{**values, **fields})


def session_body(
    dataset_id: str, num_peers: int = 1, hyperparameters: Json | list[Json] | None = None, **fields: Any
) -> Json:
    """A POST /sessions body (JSON): the dataset, the number of peers and the hyperparameters (one set
    for every peer, ``HP``'s unless given), then ``fields`` (``strategy``, ``model``, ``rounds``,
    ``seed`` …); the API's defaults for the rest."""
    hps = (
        hyperparameters
        if hyperparameters is not None
        else {"epochs": HP.epochs, "batch_size": HP.batch_size, "lr": HP.lr}
    )
    return {"dataset_id": dataset_id, "num_peers": num_peers, "hyperparameters": hps, **fields}
