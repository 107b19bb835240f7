"""The sweep strategy on its own: a ``Train`` and a ``JobContext`` in, heartbeats, a model and
``PeerDone`` reported, the model PUT through its signed URL to a real ``blob_server``, with no peer
process (and no NATS) around it."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest
import torch

from swarmtrain.common.events import Heartbeat, Hyperparameters, PeerDone, Report, Train
from swarmtrain.common.models import MlpSpec
from swarmtrain.common.settings import Settings
from swarmtrain.common.signing import UrlSigner
from swarmtrain.peer.facts import SessionFacts
from swarmtrain.peer.strategies import JobContext, sweep
from swarmtrain.peer.trainer import Diverged, TrainingStopped
from swarmtrain.training.model import load_model

PEER = "p00000000000000a1"


def command(signer: UrlSigner, blob_dir: Path, sid: str, epochs: int, lr: float = 2e-3) -> Train:
    return Train(
        peer_id=PEER,
        session_id=sid,
        dataset_uri=(blob_dir / "datasets" / "digits.csv").as_uri(),
        dataset_sha256="0" * 64,  # the dataset is handed over already fetched: sweep never reads this
        label_column="digit",
        model=MlpSpec(hidden=[32]),
        hyperparameters=Hyperparameters(epochs=epochs, batch_size=64, lr=lr),
        validation_split=0.2,
        seed=1,
        output_uri=(blob_dir / "sessions" / sid / f"{PEER}.safetensors").as_uri(),
        output_url=signer.put_url(f"sessions/{sid}/{PEER}.safetensors", 1 << 20),
    )


def context(
    settings: Settings, dataset: Path, reported: list[Report], stop: threading.Event | None = None
) -> JobContext:
    async def report(message: Report) -> None:
        reported.append(message)

    return JobContext(
        settings=settings,
        peer_id=PEER,
        device=torch.device("cpu"),
        dataset=dataset,
        report=report,
        facts=SessionFacts("s"),
        stop=stop or threading.Event(),
        stopped=asyncio.Event(),
    )


async def test_sweep_reports_a_heartbeat_per_epoch_then_done_with_the_uploaded_model(
    settings: Settings, signer: UrlSigner, blob_dir: Path, digits_path: Path
) -> None:
    cmd = command(signer, blob_dir, "s1", epochs=2)
    stored: list[Report] = []
    await sweep.run(cmd, context(settings, digits_path, stored))

    assert [type(e).__name__ for e in stored] == ["Heartbeat", "Heartbeat", "PeerDone"]
    beats = [e for e in stored if isinstance(e, Heartbeat)]
    assert [(h.event_id, h.epoch, h.epochs) for h in beats] == [(f"s1.{PEER}.epoch{n}", n, 2) for n in (1, 2)]
    [done] = [e for e in stored if isinstance(e, PeerDone)]
    assert done.event_id == f"s1.{PEER}.done" and done.model_uri == cmd.output_uri and done.epochs == 2
    data = (blob_dir / "sessions" / "s1" / f"{PEER}.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == done.model_sha256
    assert load_model(data)[1].label_column == "digit"


async def test_a_stopped_sweep_raises_and_reports_nothing(
    settings: Settings, signer: UrlSigner, blob_dir: Path, digits_path: Path
) -> None:
    stop = threading.Event()
    stop.set()
    stored: list[Report] = []
    with pytest.raises(TrainingStopped):
        await sweep.run(command(signer, blob_dir, "s2", epochs=3), context(settings, digits_path, stored, stop))
    assert stored == []
    assert not (blob_dir / "sessions" / "s2").exists()


async def test_a_diverging_sweep_raises_diverged_before_reporting_a_non_finite_figure(
    settings: Settings, signer: UrlSigner, blob_dir: Path, digits_path: Path
) -> None:
    stored: list[Report] = []
    with pytest.raises(Diverged, match=r"^diverged: non-finite loss at epoch \d+$") as raised:
        await sweep.run(command(signer, blob_dir, "s3", epochs=4, lr=1e30), context(settings, digits_path, stored))
    assert [type(e) for e in stored] == [Heartbeat] * (raised.value.epoch - 1)
    assert not (blob_dir / "sessions" / "s3").exists()
