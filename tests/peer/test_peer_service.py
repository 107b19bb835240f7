"""The peer process against a real nats-server: registration, presence, commands, training, restarts.

Events are read through ephemeral ordered JetStream consumers on the EVENTS stream; every wait is
for a message, with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
import torch
from nats.aio.client import Client as NATS

from swarmtrain.common import bus
from swarmtrain.common.events import (
    Heartbeat,
    Hyperparameters,
    ModelSpec,
    PeerDone,
    PeerFailed,
    Stop,
    Train,
)
from swarmtrain.common.settings import Settings
from swarmtrain.peer import service
from swarmtrain.peer.data import load_csv
from swarmtrain.peer.model import load_model
from tests.peer.helpers import presence, reader, registered, running_peer, stored_session_events


def train_command(
    peer_id: str, blob_dir: Path, session_id: str, *, sha256: str, epochs: int = 3, batch_size: int = 64
) -> Train:
    return Train(
        peer_id=peer_id,
        session_id=session_id,
        dataset_uri=(blob_dir / "datasets" / "digits.csv").as_uri(),
        dataset_sha256=sha256,
        label_column="digit",
        model=ModelSpec(hidden=[64, 32]),
        hyperparameters=Hyperparameters(epochs=epochs, batch_size=batch_size, lr=2e-3),
        validation_split=0.2,
        seed=1,
        output_uri=(blob_dir / "sessions" / session_id / f"{peer_id}.safetensors").as_uri(),
    )


# ------------------------------------------------------------------ tests


async def test_registers_beats_trains_and_reports(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str
) -> None:
    js = nc.jetstream()
    async with running_peer(settings, "alpha"):
        reg = await registered(js, "alpha")
        assert reg.device == "cpu"
        assert service.ID_RE.match(reg.peer_id)

        async with presence(nc, reg.peer_id) as beats:
            for _ in range(2):
                beat = await beats.wait_for(lambda b: True, timeout=5)
                assert (beat.peer_id, beat.name, beat.device, beat.session_id) == (reg.peer_id, "alpha", "cpu", None)

        # A malformed command is terminated and does not hold back the next one.
        await js.publish(f"peer.{reg.peer_id}.command", b"{not json", stream=bus.COMMANDS_STREAM)
        cmd = train_command(reg.peer_id, blob_dir, "s1", sha256=digits_sha256, epochs=4)
        async with reader(js, "session.s1.events") as session:
            await bus.send(js, cmd)
            done = await session.wait_for(PeerDone, timeout=60)

        beats_seen = [e for e in session.seen if isinstance(e, Heartbeat)]
        assert [h.epoch for h in beats_seen] == [1, 2, 3, 4]
        assert all(h.epochs == 4 and h.peer_id == reg.peer_id and h.samples_per_s > 0 for h in beats_seen)
        assert beats_seen[-1].val_accuracy == done.val_accuracy
        assert done.event_id == f"s1.{reg.peer_id}.done"
        assert done.epochs == 4 and done.train_seconds > 0
        assert done.val_accuracy is not None and done.val_accuracy > 0.8
        assert done.model_uri == cmd.output_uri

        model_file = blob_dir / "sessions" / "s1" / f"{reg.peer_id}.safetensors"
        data = model_file.read_bytes()
        assert hashlib.sha256(data).hexdigest() == done.model_sha256
        model, meta = load_model(data)
        assert meta.classes == [str(i) for i in range(10)] and meta.label_column == "digit"
        assert len(meta.feature_names) == 64
        # Self-contained: raw (unstandardized) features in, the right digits out.
        digits = load_csv(blob_dir / "datasets" / "digits.csv", "digit")
        with torch.inference_mode():
            predicted = model(digits.features).argmax(dim=1)
        assert (predicted == digits.labels).float().mean().item() > 0.8


async def test_sha256_mismatch_fails_the_peer(settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        async with reader(js, "session.bad.events") as session:
            await bus.send(js, train_command(reg.peer_id, blob_dir, "bad", sha256="0" * 64))
            failed = await session.wait_for(PeerFailed)
        assert "sha256 mismatch" in failed.reason
        assert "Traceback" not in failed.reason
        assert failed.event_id == f"bad.{reg.peer_id}.failed"
        assert not any(isinstance(e, Heartbeat) for e in session.seen)

        # Still idle and useful afterwards.
        async with reader(js, "session.good.events") as session:
            await bus.send(js, train_command(reg.peer_id, blob_dir, "good", sha256=digits_sha256, epochs=1))
            await session.wait_for(PeerDone)


async def test_stop_ends_training_promptly_and_quietly(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str
) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        cmd = train_command(reg.peer_id, blob_dir, "long", sha256=digits_sha256, epochs=100_000, batch_size=16)
        async with reader(js, "session.long.events") as session, presence(nc, reg.peer_id) as beats:
            await bus.send(js, cmd)
            await session.wait_for(Heartbeat)
            await beats.wait_for(lambda b: b.session_id == "long")
            # A Stop for another session changes nothing.
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="other"))
            await session.wait_for(Heartbeat)
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="long"))
            # 100,000 epochs would take hours: an idle peer now means the Stop ended the training
            await beats.wait_for(lambda b: b.session_id is None, timeout=10)
        stored = await stored_session_events(js, "long")
        assert not any(isinstance(e, PeerDone | PeerFailed) for e in stored)
        assert not (blob_dir / "sessions" / "long").exists()


async def test_shutdown_mid_training_reports_peer_failed(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str
) -> None:
    js = nc.jetstream()
    async with reader(js, "session.cut.events") as session:
        async with running_peer(settings) as task:
            reg = await registered(js, "alpha")
            await bus.send(js, train_command(reg.peer_id, blob_dir, "cut", sha256=digits_sha256, epochs=100_000))
            await session.wait_for(Heartbeat)
        assert task.done()
        failed = await session.wait_for(PeerFailed, timeout=10)
    assert failed.reason == "peer shut down"


async def test_restart_keeps_id_and_receives_commands_sent_while_down(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str
) -> None:
    js = nc.jetstream()
    async with running_peer(settings, "alpha"):
        first = await registered(js, "alpha")
    assert (Path(settings.state_dir) / "peers" / "alpha.id").read_text().strip() == first.peer_id

    # Sent while no peer runs: it waits in the peer's durable consumer.
    await bus.send(js, train_command(first.peer_id, blob_dir, "late", sha256=digits_sha256, epochs=1))

    async with reader(js, "session.late.events") as session, running_peer(settings, "alpha"):
        again = await registered(js, "alpha", after=1)
        assert again.peer_id == first.peer_id
        done = await session.wait_for(PeerDone)
        assert done.peer_id == first.peer_id

    # Another name is another peer.
    async with running_peer(settings, "beta"):
        other = await registered(js, "beta")
    assert other.peer_id != first.peer_id


async def test_second_peer_with_the_same_name_is_refused(settings: Settings, nc: NATS) -> None:
    js = nc.jetstream()
    async with running_peer(settings, "alpha"):
        await registered(js, "alpha")
        with pytest.raises(SystemExit, match="a peer named 'alpha' is already running here; pass --name"):
            await service.run(settings, asyncio.Event(), name="alpha", device="cpu")


async def test_bad_name_and_device_are_refused(settings: Settings) -> None:
    with pytest.raises(SystemExit, match="invalid peer name"):
        await service.run(settings, asyncio.Event(), name="../evil", device="cpu")
    with pytest.raises(SystemExit, match="--device tpu"):
        await service.run(settings, asyncio.Event(), name="alpha", device="tpu")
