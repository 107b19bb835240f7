"""The sweep strategy on its own: a ``Train`` and a ``JobContext`` in, heartbeats, a model and
``PeerDone`` out, on a real nats-server and a blob folder, with no peer process around it."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest
import torch
from nats.aio.client import Client as NATS

from swarmtrain.common import bus
from swarmtrain.common.events import Event, Heartbeat, Hyperparameters, ModelSpec, PeerDone, Train
from swarmtrain.common.settings import Settings
from swarmtrain.peer.model import load_model
from swarmtrain.peer.strategies import JobContext, sweep
from swarmtrain.peer.trainer import TrainingStopped
from tests.peer.helpers import stored_session_events

PEER = "p00000000000000a1"


def command(blob_dir: Path, sid: str, epochs: int) -> Train:
    return Train(
        peer_id=PEER,
        session_id=sid,
        dataset_uri=(blob_dir / "datasets" / "digits.csv").as_uri(),
        dataset_sha256="0" * 64,  # the dataset is handed over already fetched: sweep never reads this
        label_column="digit",
        model=ModelSpec(hidden=[32]),
        hyperparameters=Hyperparameters(epochs=epochs, batch_size=64, lr=2e-3),
        validation_split=0.2,
        seed=1,
        output_uri=(blob_dir / "sessions" / sid / f"{PEER}.safetensors").as_uri(),
    )


def context(settings: Settings, nc: NATS, dataset: Path, stop: threading.Event | None = None) -> JobContext:
    js = nc.jetstream()

    async def append(event: Event, attempts: int = 5) -> bool:
        await bus.append(js, event)
        return True

    return JobContext(
        settings=settings,
        js=js,
        peer_id=PEER,
        device=torch.device("cpu"),
        dataset=dataset,
        append=append,
        stop=stop or threading.Event(),
        stopped=asyncio.Event(),
    )


async def test_sweep_appends_a_heartbeat_per_epoch_then_done_with_the_uploaded_model(
    settings: Settings, nc: NATS, blob_dir: Path, digits_path: Path
) -> None:
    cmd = command(blob_dir, "s1", epochs=2)
    await sweep.run(cmd, context(settings, nc, digits_path))

    stored = await stored_session_events(nc.jetstream(), "s1")
    assert [type(e).__name__ for e in stored] == ["Heartbeat", "Heartbeat", "PeerDone"]
    beats = [e for e in stored if isinstance(e, Heartbeat)]
    assert [(h.event_id, h.epoch, h.epochs) for h in beats] == [(f"s1.{PEER}.epoch{n}", n, 2) for n in (1, 2)]
    [done] = [e for e in stored if isinstance(e, PeerDone)]
    assert done.event_id == f"s1.{PEER}.done" and done.model_uri == cmd.output_uri and done.epochs == 2
    data = (blob_dir / "sessions" / "s1" / f"{PEER}.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == done.model_sha256
    assert load_model(data)[1].label_column == "digit"


async def test_a_stopped_sweep_raises_and_publishes_nothing(
    settings: Settings, nc: NATS, blob_dir: Path, digits_path: Path
) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingStopped):
        await sweep.run(command(blob_dir, "s2", epochs=3), context(settings, nc, digits_path, stop))
    assert await stored_session_events(nc.jetstream(), "s2") == []
    assert not (blob_dir / "sessions" / "s2").exists()
