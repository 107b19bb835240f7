"""The blob store's layout is part of the contract: stored URIs in the log name these keys."""

from __future__ import annotations

from pathlib import Path

from swarmtrain.common import blobkeys
from swarmtrain.common.blob import FileStore


def test_every_key_of_the_layout() -> None:
    assert blobkeys.dataset("d1") == "datasets/d1.csv"
    assert blobkeys.session_prefix("s1") == "sessions/s1/"
    assert blobkeys.model("s1", "p1") == "sessions/s1/models/p1.safetensors"
    assert blobkeys.rounds("s1") == "sessions/s1/rounds"
    assert blobkeys.init_model("s1") == "sessions/s1/init/start.safetensors"
    assert blobkeys.checkpoints("s1", "p1") == "sessions/s1/checkpoints/p1"
    assert blobkeys.checkpoint_uri("file:///b/sessions/s1/checkpoints/p1/", 4) == (
        "file:///b/sessions/s1/checkpoints/p1/4.safetensors"
    )


def test_round_uris_lie_under_the_rounds_uri_and_lead_back_to_it(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    rounds_uri = store.uri(blobkeys.rounds("s1"))
    update, average = blobkeys.update_uri(rounds_uri, 3, "p1"), blobkeys.average_uri(rounds_uri + "/", 3)
    assert store.key_of(update) == "sessions/s1/rounds/3/p1.safetensors"
    assert store.key_of(average) == "sessions/s1/rounds/3/average.safetensors"
    assert blobkeys.rounds_uri_of(update, 3) == blobkeys.rounds_uri_of(average, 3) == rounds_uri
    assert all(store.key_of(u).startswith(blobkeys.session_prefix("s1")) for u in (update, average))
