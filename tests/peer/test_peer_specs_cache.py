"""A peer's specs in its registration, its parsed-dataset cache and its precision, against a real
nats-server: the test plays the scheduler's part (``Train`` commands with signed URLs)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from swarmtrain.common.events import Heartbeat, Hyperparameters, PeerDone, PeerFailed, Train
from swarmtrain.common.models import MlpSpec
from swarmtrain.common.settings import Settings
from swarmtrain.peer import trainer
from swarmtrain.peer.cache import ParsedCache
from tests.peer.helpers import SchedulerPart, registered, reports, running_peer


def train(peer_id: str, blob_dir: Path, session_id: str, sha256: str, **fields: object) -> Train:
    return Train(
        peer_id=peer_id,
        session_id=session_id,
        dataset_uri=(blob_dir / "datasets" / "digits.csv").as_uri(),
        dataset_sha256=sha256,
        label_column="digit",
        model=MlpSpec(hidden=[16]),
        hyperparameters=Hyperparameters(epochs=1, batch_size=128, lr=1e-3),
        validation_split=0.2,
        seed=1,
        output_uri=(blob_dir / "sessions" / session_id / f"{peer_id}.safetensors").as_uri(),
        **fields,  # type: ignore[arg-type]
    )


def parse_count(result: str) -> float:
    return REGISTRY.get_sample_value("swarmtrain_peer_parse_cache_total", {"result": result}) or 0.0


async def test_the_registration_carries_the_specs_and_labels(settings: Settings, nc: NATS) -> None:
    async with running_peer(settings, "speccy", labels={"region": "eu", "tier": "gold"}):
        reg = await registered(nc.jetstream(), "speccy")
    assert reg.specs is not None
    assert reg.specs.labels == {"region": "eu", "tier": "gold"}
    assert reg.specs.device_index is None and reg.specs.cpu_cores >= 1 and reg.specs.memory_bytes > 0
    assert reg.specs.torch_version and reg.specs.os


async def test_a_second_session_on_the_same_dataset_skips_the_parse(
    settings: Settings,
    nc: NATS,
    blob_dir: Path,
    digits_sha256: str,
    scheduler: SchedulerPart,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache: ParsedCache[object] = ParsedCache(trainer.PARSED_CACHE_BYTES, trainer._dataset_bytes)  # type: ignore[arg-type]
    monkeypatch.setattr(trainer, "PARSED", cache)  # this test's own, empty: other tests parsed digits too
    hits, misses = parse_count("hit"), parse_count("miss")
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        for sid in ("first", "second"):
            async with reports(js, sid) as session:
                await scheduler.train(train(reg.peer_id, blob_dir, sid, digits_sha256))
                await session.wait_for(PeerDone, timeout=60)
    stats = cache.stats()
    assert (stats.misses, stats.hits, stats.entries) == (1, 1, 1)
    assert (parse_count("miss") - misses, parse_count("hit") - hits) == (1, 1)


async def test_heartbeats_say_which_precision_ran_and_a_cpu_peer_refuses_fp16(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    async with running_peer(settings):
        reg = await registered(js, "alpha")
        async with reports(js, "bf16") as session:
            await scheduler.train(train(reg.peer_id, blob_dir, "bf16", digits_sha256, precision="bf16"))
            await session.wait_for(PeerDone, timeout=60)
        beats = [e for e in session.seen if isinstance(e, Heartbeat)]
        assert beats and {b.precision for b in beats} == {"bf16"}

        async with reports(js, "fp16") as session:
            await scheduler.train(train(reg.peer_id, blob_dir, "fp16", digits_sha256, precision="fp16"))
            failed = await session.wait_for(PeerFailed, timeout=30)
        assert failed.reason == "fp16 needs a CUDA peer: this peer trains on the CPU (ask for bf16 or fp32)"


def test_precision_rules_on_the_cpu() -> None:
    import torch

    cpu = torch.device("cpu")
    assert trainer.Amp.for_device("fp32", cpu).dtype is None
    assert trainer.Amp.for_device("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(trainer.PrecisionUnsupported, match="fp16 needs a CUDA peer"):
        trainer.Amp.for_device("fp16", cpu)
    assert msgspec.json.decode(b'"bf16"', type=trainer.Precision) == "bf16"
