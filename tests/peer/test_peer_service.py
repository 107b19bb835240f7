"""The peer process against a real nats-server: registration, presence, commands, training, restarts.

The test plays the scheduler's part: it sends ``Train`` commands with URLs signed for the
``blob_server`` and reads what the peer reports on ``peer.<id>.reports`` (stream REPORTS); the peer
writes nothing to EVENTS. Every wait is for a message, with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest
import torch
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from swarmtrain.common import bus, events, servers
from swarmtrain.common.events import (
    DataSpec,
    Heartbeat,
    Hyperparameters,
    PeerDone,
    PeerFailed,
    Stop,
    Train,
)
from swarmtrain.common.models import MlpSpec
from swarmtrain.common.settings import Settings
from swarmtrain.common.signing import UrlSigner
from swarmtrain.peer import service
from swarmtrain.training.data import load
from swarmtrain.training.model import load_model
from tests.peer.helpers import SchedulerPart, events_stored, presence, registered, reports, running_peer, stored_reports
from tests.support import wait_for


def train_command(
    peer_id: str,
    blob_dir: Path,
    session_id: str,
    *,
    sha256: str,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> Train:
    return Train(
        peer_id=peer_id,
        session_id=session_id,
        dataset_uri=(blob_dir / "datasets" / "digits.csv").as_uri(),
        dataset_sha256=sha256,
        label_column="digit",
        model=MlpSpec(hidden=[64, 32]),
        hyperparameters=Hyperparameters(epochs=epochs, batch_size=batch_size, lr=lr),
        validation_split=0.2,
        seed=1,
        output_uri=(blob_dir / "sessions" / session_id / f"{peer_id}.safetensors").as_uri(),
    )


async def command_consumer_settled(js: JetStreamContext, peer_id: str) -> bool:
    """Every command delivered to the peer is acked and none waits: nothing nak-ed or pending."""
    info = await js.consumer_info(bus.COMMANDS_STREAM, f"peer-{peer_id}")
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


# ------------------------------------------------------------------ tests


async def test_registers_beats_trains_and_reports(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings, "alpha"):
        reg = await registered(js, "alpha")
        assert reg.device == "cpu"
        assert service.ID_RE.match(reg.peer_id)

        async with presence(nc, reg.peer_id) as beats:
            for _ in range(2):
                beat = await beats.wait_for(lambda b: True, timeout=5)
                assert (beat.peer_id, beat.name, beat.device, beat.session_id, beat.train_id) == (
                    reg.peer_id, "alpha", "cpu", None, None,
                )  # fmt: skip

        # A malformed command is terminated and does not hold back the next one.
        await js.publish(f"peer.{reg.peer_id}.command", b"{not json", stream=bus.COMMANDS_STREAM)
        async with reports(js, "s1") as session:
            cmd = await scheduler.train(train_command(reg.peer_id, blob_dir, "s1", sha256=digits_sha256, epochs=4))
            done = await session.wait_for(PeerDone, timeout=60)

        beats_seen = [e for e in session.seen if isinstance(e, Heartbeat)]
        assert [h.epoch for h in beats_seen] == [1, 2, 3, 4]
        assert all(h.epochs == 4 and h.peer_id == reg.peer_id and h.samples_per_s > 0 for h in beats_seen)
        assert beats_seen[-1].val_accuracy == done.val_accuracy
        assert done.event_id == f"s1.{reg.peer_id}.done"
        assert done.epochs == 4 and done.train_seconds > 0
        assert done.val_accuracy is not None and done.val_accuracy > 0.8
        assert done.model_uri == cmd.output_uri  # the object's name, never the signed URL

        # written through the signed PUT URL into the store
        model_file = blob_dir / "sessions" / "s1" / f"{reg.peer_id}.safetensors"
        data = model_file.read_bytes()
        assert hashlib.sha256(data).hexdigest() == done.model_sha256
        model, meta = load_model(data)
        assert meta.classes == [str(i) for i in range(10)] and meta.label_column == "digit"
        assert len(meta.feature_names) == 64
        # Self-contained: raw (unstandardized) features in, the right digits out.
        digits = load(blob_dir / "datasets" / "digits.csv", DataSpec(), "digit")
        with torch.inference_mode():
            predicted = model(digits.features).argmax(dim=1)
        assert (predicted == digits.labels).float().mean().item() > 0.8
        await wait_for(lambda: command_consumer_settled(js, reg.peer_id), "the commands acked")
    assert await events_stored(js) == 0, "a peer reports; it never writes a fact"


async def test_sha256_mismatch_fails_the_peer(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        async with reports(js, "bad") as session:
            await scheduler.train(train_command(reg.peer_id, blob_dir, "bad", sha256="0" * 64))
            failed = await session.wait_for(PeerFailed)
        assert "sha256 mismatch" in failed.reason
        assert "Traceback" not in failed.reason
        assert failed.event_id == f"bad.{reg.peer_id}.failed"
        assert not any(isinstance(e, Heartbeat) for e in session.seen)

        # A Train without its signed dataset URL cannot be followed: the peer holds no storage key.
        async with reports(js, "unsigned") as session:
            await bus.send(js, train_command(reg.peer_id, blob_dir, "unsigned", sha256=digits_sha256))
            failed = await session.wait_for(PeerFailed)
        assert "dataset_url" in failed.reason

        # Still idle and useful afterwards.
        async with reports(js, "good") as session:
            await scheduler.train(train_command(reg.peer_id, blob_dir, "good", sha256=digits_sha256, epochs=1))
            await session.wait_for(PeerDone)


async def test_every_download_is_capped(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    capped = msgspec.structs.replace(settings, blob_max_download_mb=0)
    async with running_peer(capped):
        reg = await registered(js, "alpha")
        async with reports(js, "big") as session:
            await scheduler.train(train_command(reg.peer_id, blob_dir, "big", sha256=digits_sha256))
            failed = await session.wait_for(PeerFailed)
    assert failed.reason.startswith("download too large") and "0-byte cap" in failed.reason
    assert "sig=" not in failed.reason  # the URL's credential is never reported
    assert not (Path(settings.state_dir) / "cache" / "datasets" / f"{digits_sha256}.csv").exists()


async def test_a_diverging_run_fails_with_a_reason_and_no_non_finite_figure(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        async with reports(js, "boom") as session, presence(nc, reg.peer_id) as beats:
            cmd = train_command(reg.peer_id, blob_dir, "boom", sha256=digits_sha256, epochs=5, lr=1e30)
            await scheduler.train(cmd)
            failed = await session.wait_for(PeerFailed, timeout=60)
            await beats.wait_for(lambda b: b.session_id is None)  # free for the next job
    assert failed.reason.startswith("diverged: non-finite loss at epoch ")
    epoch = int(failed.reason.rsplit(" ", 1)[1])
    assert 1 <= epoch <= 5
    heartbeats = [e for e in session.seen if isinstance(e, Heartbeat)]
    assert [h.epoch for h in heartbeats] == list(range(1, epoch))  # every figure reported is finite
    assert not any(isinstance(e, PeerDone) for e in session.seen)
    for report in session.seen:  # and decodes with a decoder that refuses NaN
        events.decode_report(events.encode(report))


async def test_a_busy_peer_takes_the_next_train_once_free_and_ignores_a_resent_one(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        first = train_command(reg.peer_id, blob_dir, "first", sha256=digits_sha256, epochs=100_000, batch_size=16)
        second = train_command(reg.peer_id, blob_dir, "second", sha256=digits_sha256, epochs=1)
        async with reports(js) as seen, presence(nc, reg.peer_id) as beats:
            first = await scheduler.train(first)
            await seen.wait_for(Heartbeat, lambda h: h.session_id == "first")
            beat = await beats.wait_for(lambda b: b.session_id == "first")
            assert beat.train_id == first.event_id

            # The same Train again (a scheduler re-send, past JetStream's dedupe: no Nats-Msg-Id):
            # acked and ignored, the job goes on.
            await js.publish(first.subject, events.encode(first), stream=bus.COMMANDS_STREAM)
            await wait_for(lambda: command_consumer_settled(js, reg.peer_id), "the re-sent Train acked")

            # Another Train while busy is not acked (it comes again) and not dropped.
            await scheduler.train(second)

            async def held_back() -> bool:
                info = await js.consumer_info(bus.COMMANDS_STREAM, f"peer-{reg.peer_id}")
                return bool(info.num_ack_pending + info.num_pending >= 1 and info.num_redelivered >= 1)

            await wait_for(held_back, "the second Train nak-ed for later")
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="first"))
            done = await seen.wait_for(PeerDone, lambda d: d.session_id == "second", timeout=60)
            await beats.wait_for(lambda b: b.session_id is None)
        await wait_for(lambda: command_consumer_settled(js, reg.peer_id), "every command acked")
    assert done.peer_id == reg.peer_id
    stored = await stored_reports(js, "first")
    assert not any(isinstance(e, PeerDone | PeerFailed) for e in stored)
    # one run of "first": its epochs were each reported once, in order
    epochs = [e.epoch for e in stored if isinstance(e, Heartbeat)]
    assert epochs == list(range(1, len(epochs) + 1))


async def test_a_train_stopped_before_it_could_start_is_dropped(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        async with reports(js) as seen, presence(nc, reg.peer_id) as beats:
            await scheduler.train(
                train_command(reg.peer_id, blob_dir, "long", sha256=digits_sha256, epochs=100_000, batch_size=16)
            )
            await seen.wait_for(Heartbeat, lambda h: h.session_id == "long")
            await scheduler.train(train_command(reg.peer_id, blob_dir, "gone", sha256=digits_sha256, epochs=1))
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="gone"))  # "gone" waits, then is stopped
            await scheduler.train(train_command(reg.peer_id, blob_dir, "next", sha256=digits_sha256, epochs=1))
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="long"))
            await seen.wait_for(PeerDone, lambda d: d.session_id == "next", timeout=60)
            await beats.wait_for(lambda b: b.session_id is None)
            await wait_for(lambda: command_consumer_settled(js, reg.peer_id), "every command acked")
    assert await stored_reports(js, "gone") == []


async def test_reports_due_during_a_nats_outage_are_delivered_once_nats_is_back(
    settings: Settings,
    nats_server: tuple[str, subprocess.Popen[bytes]],
    tmp_path: Path,
    blob_dir: Path,
    digits_sha256: str,
    signer: UrlSigner,
) -> None:
    url, first = nats_server
    restarted: list[subprocess.Popen[bytes]] = []
    client = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = client.jetstream()
        await bus.ensure_streams(js)
        scheduler = SchedulerPart(js, signer, blob_dir)
        async with running_peer(settings):
            reg = await registered(js, "alpha")
            async with reports(js, "outage") as session:
                cmd = train_command(reg.peer_id, blob_dir, "outage", sha256=digits_sha256, epochs=3)
                await scheduler.train(cmd)
                await session.wait_for(Heartbeat)
            servers.stop(first, signal.SIGTERM)  # NATS goes away mid-run, its store kept
            # The outage lasts at least one publish's timeout: long after the three short epochs
            # ended, so the peer's later heartbeats and its PeerDone fall due while NATS is down.
            with pytest.raises(nats.errors.Error):
                await js.stream_info(bus.REPORTS_STREAM)  # waits out the context's 5 s timeout
            restarted.append(servers.start_nats(int(url.rsplit(":", 1)[1]), tmp_path / "jetstream"))
            async with reports(js, "outage") as session:
                done = await session.wait_for(PeerDone, timeout=60)
            assert [h.epoch for h in session.seen if isinstance(h, Heartbeat)] == [1, 2, 3]  # none lost
            model = blob_dir / "sessions" / "outage" / f"{reg.peer_id}.safetensors"
            assert hashlib.sha256(model.read_bytes()).hexdigest() == done.model_sha256
        await client.drain()
    finally:
        if not client.is_closed:
            await client.close()
        for proc in restarted:
            servers.stop(proc, signal.SIGTERM)


async def test_stop_ends_training_promptly_and_quietly(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        cmd = train_command(reg.peer_id, blob_dir, "long", sha256=digits_sha256, epochs=100_000, batch_size=16)
        async with reports(js, "long") as session, presence(nc, reg.peer_id) as beats:
            await scheduler.train(cmd)
            await session.wait_for(Heartbeat)
            await beats.wait_for(lambda b: b.session_id == "long")
            # A Stop for another session changes nothing.
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="other"))
            await session.wait_for(Heartbeat)
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="long"))
            # 100,000 epochs would take hours: an idle peer now means the Stop ended the training
            await beats.wait_for(lambda b: b.session_id is None and b.train_id is None, timeout=10)
        stored = await stored_reports(js, "long")
        assert not any(isinstance(e, PeerDone | PeerFailed) for e in stored)
        assert not (blob_dir / "sessions" / "long").exists()


async def test_shutdown_mid_training_reports_peer_failed(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with reports(js, "cut") as session:
        async with running_peer(settings) as task:
            reg = await registered(js, "alpha")
            cmd = train_command(reg.peer_id, blob_dir, "cut", sha256=digits_sha256, epochs=100_000)
            await scheduler.train(cmd)
            await session.wait_for(Heartbeat)
        assert task.done()
        failed = await session.wait_for(PeerFailed, timeout=10)
    assert failed.reason == "peer shut down"


async def test_restart_keeps_id_and_receives_commands_sent_while_down(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings, "alpha"):
        first = await registered(js, "alpha")
    assert (Path(settings.state_dir) / "peers" / "alpha.id").read_text().strip() == first.peer_id

    # Sent while no peer runs: it waits in the peer's durable consumer.
    await scheduler.train(train_command(first.peer_id, blob_dir, "late", sha256=digits_sha256, epochs=1))

    async with reports(js, "late") as session, running_peer(settings, "alpha"):
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


async def test_a_search_peer_takes_one_train_per_trial_and_stops_only_a_pruned_trial(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        long = train_command(reg.peer_id, blob_dir, "srch", sha256=digits_sha256, epochs=100_000, batch_size=16)
        long = msgspec.structs.replace(long, event_id=f"srch.{reg.peer_id}.train.trial0.0", trial=0)
        short = train_command(reg.peer_id, blob_dir, "srch", sha256=digits_sha256, epochs=2)
        short = msgspec.structs.replace(
            short,
            event_id=f"srch.{reg.peer_id}.train.trial1.0",
            trial=1,
            output_uri=(blob_dir / "sessions" / "srch" / "trials" / "1" / f"{reg.peer_id}.safetensors").as_uri(),
        )
        async with reports(js, "srch") as session, presence(nc, reg.peer_id) as beats:
            await scheduler.train(long)
            beat = await session.wait_for(Heartbeat)
            assert beat.trial == 0 and beat.event_id.startswith(long.event_id + ".epoch")
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="srch", trial=1))  # not its trial
            await session.wait_for(Heartbeat, lambda b: b.epoch >= beat.epoch + 1)
            await bus.send(js, Stop(peer_id=reg.peer_id, session_id="srch", trial=0))  # pruned
            await beats.wait_for(lambda b: b.train_id is None, timeout=10)
            await scheduler.train(short)  # the next trial of the same session: not dropped by the Stop
            done = await session.wait_for(PeerDone, timeout=60)
        assert done.trial == 1 and done.event_id == f"{short.event_id}.done"
        stored = await stored_reports(js, "srch")
        assert not any(isinstance(e, PeerFailed) for e in stored)
        assert not any(isinstance(e, PeerDone) and e.trial == 0 for e in stored)
