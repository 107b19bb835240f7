"""Every object key of the blob store, built in one place (as ``subjects`` builds every subject).

A key is a relative, '/'-separated path (``blob.BlobStore`` confines it); a store turns it into a
URI (``store.uri(key)``). What the log and the commands carry are URIs; the round URIs below are
built from a session's ``rounds_uri`` (``Train.rounds_uri``), so a peer, which holds URIs and never
keys, builds the very names the scheduler checks its reports against.

```
datasets/<dataset_id>.<extension>                an uploaded dataset (``formats.rules(f).extension``: .csv, ...)
datasets/<dataset_id>.tokenizer.json             a text dataset's BPE tokenizer, trained at upload
sessions/<session_id>/                           everything a session writes, and nothing else
sessions/<session_id>/models/<peer_id>.safetensors   a run's final model (Train.output_uri)
sessions/<session_id>/trials/<n>/<peer_id>.safetensors   a search's trial n's model
sessions/<session_id>/rounds/<r>/<peer_id>.safetensors   fedavg: a peer's update of round r
sessions/<session_id>/rounds/<r>/average.safetensors     fedavg: round r's averaged model
sessions/<session_id>/init/start.safetensors     a fork's recomputed starting model
sessions/<session_id>/checkpoints/<peer_id>/<epoch>.safetensors   a sweep run's checkpoint after epoch
```
"""

from __future__ import annotations

from swarmtrain.common import formats
from swarmtrain.common.events import CSV


def dataset(dataset_id: str, data_format: str = CSV) -> str:
    """An uploaded dataset: its extension is its format's (``datasets/<id>.csv`` for a CSV)."""
    return f"datasets/{dataset_id}.{formats.rules(data_format).extension}"


def tokenizer(dataset_id: str) -> str:
    """A text dataset's BPE tokenizer (JSON), trained at upload and stored beside it."""
    return f"datasets/{dataset_id}.tokenizer.json"


def session_prefix(session_id: str) -> str:
    """The prefix of every object of a session (a session's model is served only from under it)."""
    return f"sessions/{session_id}/"


def model(session_id: str, peer_id: str) -> str:
    """A run's final model: its ``Train.output_uri``, the only URI its ``PeerDone`` may name."""
    return f"{session_prefix(session_id)}models/{peer_id}.safetensors"


def trial_model(session_id: str, trial: int, peer_id: str) -> str:
    """A search's trial's final model, as run by ``peer_id`` (a re-run elsewhere writes its own)."""
    return f"{session_prefix(session_id)}trials/{trial}/{peer_id}.safetensors"


def checkpoints(session_id: str, peer_id: str) -> str:
    """The folder of a sweep run's checkpoints: its ``Train.checkpoints_uri``."""
    return f"{session_prefix(session_id)}checkpoints/{peer_id}"


def checkpoint_uri(checkpoints_uri: str, epoch: int) -> str:
    """A sweep run's training state after ``epoch`` (``CheckpointSaved.uri``): one object an epoch,
    so the last reported one is never overwritten while the next is written."""
    return f"{checkpoints_uri.rstrip('/')}/{epoch}.safetensors"


def rounds(session_id: str) -> str:
    """The folder of a session's rounds: its ``Train.rounds_uri``."""
    return f"{session_prefix(session_id)}rounds"


def init_model(session_id: str) -> str:
    """A fork's recomputed starting model, under the new session's prefix."""
    return f"{session_prefix(session_id)}init/start.safetensors"


def update_uri(rounds_uri: str, round_: int, peer_id: str) -> str:
    """Where ``peer_id`` writes its update of ``round_``: the only URI its report may name."""
    return f"{rounds_uri.rstrip('/')}/{round_}/{peer_id}.safetensors"


def average_uri(rounds_uri: str, round_: int) -> str:
    """Where round ``round_``'s averaged model is stored (identical bytes from every peer)."""
    return f"{rounds_uri.rstrip('/')}/{round_}/average.safetensors"


def rounds_uri_of(round_file_uri: str, round_: int) -> str:
    """The ``rounds_uri`` an update's or average's URI of ``round_`` lies under."""
    return round_file_uri.rsplit(f"/{round_}/", 1)[0]
