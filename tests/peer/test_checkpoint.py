"""A checkpoint restores a run exactly: resumed after epoch k, it ends with the bit-for-bit weights
and figures of the run that never stopped (CPU); a checkpoint that does not fit is refused."""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import pytest
import torch

from swarmtrain.common.events import Hyperparameters, MlpSpec, ModelSpec
from swarmtrain.common.models import LayersSpec
from swarmtrain.peer import checkpoint
from swarmtrain.peer.checkpoint import CheckpointError
from swarmtrain.peer.trainer import EpochStats, TrainJob, train
from swarmtrain.training import tensorfile


def _job(path: Path, hp: Hyperparameters, model: ModelSpec | None = None, resume: bytes | None = None) -> TrainJob:
    return TrainJob(
        csv_path=path,
        label_column="digit",
        model=model or MlpSpec(hidden=[32]),
        hyperparameters=hp,
        validation_split=0.2,
        seed=3,
        device="cpu",
        torch_threads=1,
        resume=resume,
    )


def _run(job: TrainJob) -> tuple[list[EpochStats], dict[int, bytes], dict[str, torch.Tensor]]:
    seen: list[EpochStats] = []
    saved: dict[int, bytes] = {}
    result = train(job, seen.append, threading.Event(), lambda epoch, data: saved.__setitem__(epoch, data))
    return seen, saved, result.model.state_dict()


HPS = [
    # AdamW, cosine with warmup, clipping, accumulation over a partial last batch
    Hyperparameters(
        epochs=4,
        batch_size=48,
        lr=3e-3,
        weight_decay=0.01,
        lr_schedule="cosine",
        warmup_steps=7,
        grad_clip_norm=1.0,
        grad_accumulation=2,
        checkpoint_every=2,
    ),
    Hyperparameters(epochs=3, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9, checkpoint_every=1),
]


@pytest.mark.parametrize("hp", HPS, ids=["adamw-cosine", "sgd"])
def test_a_run_resumed_from_its_checkpoint_ends_bit_for_bit_as_one_never_stopped(
    digits_path: Path, hp: Hyperparameters
) -> None:
    # dropout draws from torch's own generator: restored too
    model = msgspec.convert(
        {
            "kind": "layers",
            "layers": [
                {"type": "linear", "out": 32},
                {"type": "relu"},
                {"type": "dropout", "p": 0.3},
                {"type": "linear", "out": 10},
            ],
        },
        LayersSpec,
    )
    whole, saved, weights = _run(_job(digits_path, hp, model))
    every = hp.checkpoint_every
    assert sorted(saved) == [e for e in range(every, hp.epochs, every)]  # never after the last epoch
    at = max(saved)
    torch.manual_seed(12345)  # a fresh process's generator is not the run's: the checkpoint's is
    resumed, again, resumed_weights = _run(_job(digits_path, hp, model, resume=saved[at]))
    assert [s.epoch for s in resumed] == list(range(at + 1, hp.epochs + 1))
    assert [(s.loss, s.accuracy, s.val_loss) for s in resumed] == [(s.loss, s.accuracy, s.val_loss) for s in whole[at:]]
    assert set(resumed_weights) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    assert set(again) == {e for e in saved if e > at}
    assert all(again[e] == saved[e] for e in again)  # the same state, the same bytes


def test_without_checkpoint_every_no_checkpoint_is_made(digits_path: Path) -> None:
    _, saved, _ = _run(_job(digits_path, Hyperparameters(epochs=2, batch_size=256, lr=1e-3)))
    assert saved == {}


def _saved(digits_path: Path, hp: Hyperparameters) -> bytes:
    _, saved, _ = _run(_job(digits_path, hp))
    return saved[1]


def test_a_checkpoint_that_does_not_fit_the_run_is_refused(digits_path: Path) -> None:
    hp = Hyperparameters(epochs=3, batch_size=256, lr=1e-3, checkpoint_every=1)
    good = _saved(digits_path, hp)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        train(_job(digits_path, hp, resume=b"\x00" * 64), lambda s: None, threading.Event())
    with pytest.raises(CheckpointError, match="this run trains 5 epochs"):
        train(_job(digits_path, msgspec.structs.replace(hp, epochs=5), resume=good), lambda s: None, threading.Event())
    with pytest.raises(CheckpointError, match="model tensor"):
        train(_job(digits_path, hp, MlpSpec(hidden=[16]), resume=good), lambda s: None, threading.Event())
    with pytest.raises(CheckpointError, match="optimizer steps"):  # another batch size: another data order
        train(
            _job(digits_path, msgspec.structs.replace(hp, batch_size=64), resume=good),
            lambda s: None,
            threading.Event(),
        )
    tensors = dict(tensorfile.loads(good))
    meta = tensorfile.read_metadata(good)
    assert meta is not None
    extra = tensorfile.dumps({**tensors, "optim.0.evil": torch.zeros(1)}, meta)
    with pytest.raises(CheckpointError, match="not one of this run's"):
        train(_job(digits_path, hp, resume=extra), lambda s: None, threading.Event())
    stranger = tensorfile.dumps({**tensors, "rng.other": torch.zeros(3, dtype=torch.uint8)}, meta)
    with pytest.raises(CheckpointError, match="not this run's"):
        train(_job(digits_path, hp, resume=stranger), lambda s: None, threading.Event())
    assert checkpoint.FORMAT in meta[checkpoint.METADATA_KEY]
