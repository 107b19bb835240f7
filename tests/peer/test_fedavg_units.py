"""Shards, the cnn, deterministic model files and a peer's local rounds: plain function calls."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest
import torch
from torch import nn

from swarmtrain.common.events import DataSpec, Hyperparameters, ModelSpec, Train
from swarmtrain.common.fedopts import RoundOptions, ShardingSpec
from swarmtrain.common.models import CnnSpec, MlpSpec, TransformerSpec
from swarmtrain.peer.strategies.fedavg import LocalLearner, check_command, round_seed
from swarmtrain.peer.trainer import EpochStats, PrecisionUnsupported, TrainJob, cpu_bf16_supported, train
from swarmtrain.training.averaging import state_bytes, weighted_average
from swarmtrain.training.data import DataError, shard_indices
from swarmtrain.training.model import ModelMetadata, build_model, load_model, model_bytes, save_model

CNN_8 = CnnSpec(input_shape=[1, 8, 8], channels=[16, 32], hidden=[64])

# ------------------------------------------------------------------ shards


@pytest.mark.parametrize(("n", "shards"), [(1437, 4), (10, 3), (7, 7), (5, 1)])
def test_shards_are_disjoint_covering_near_equal_and_seeded(n: int, shards: int) -> None:
    train_idx = torch.randperm(2 * n, generator=torch.Generator().manual_seed(0))[:n]  # any row numbers
    parts = [shard_indices(train_idx, shards, s, seed=3) for s in range(shards)]
    assert sorted(torch.cat(parts).tolist()) == sorted(train_idx.tolist())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert all(torch.equal(p, shard_indices(train_idx, shards, s, seed=3)) for s, p in enumerate(parts))
    if shards > 1 and n > 3:
        assert not torch.equal(parts[0], shard_indices(train_idx, shards, 0, seed=4))


@pytest.mark.parametrize(("shards", "shard"), [(0, 0), (3, 3), (3, -1), (11, 0)])
def test_impossible_shards_are_refused(shards: int, shard: int) -> None:
    with pytest.raises(DataError):
        shard_indices(torch.arange(10), shards, shard, seed=0)


def test_round_seed_depends_on_seed_shard_and_round() -> None:
    seeds = {round_seed(s, shard, r) for s in range(2) for shard in range(3) for r in range(1, 4)}
    assert len(seeds) == 18 and all(0 <= s < 2**63 for s in seeds)
    assert round_seed(1, 2, 3) == round_seed(1, 2, 3)


# ------------------------------------------------------------------ the cnn


def test_cnn_layers_and_shapes_on_8x8_digits() -> None:
    model = build_model(CNN_8, n_features=64, n_classes=10)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 16, (3, 3), (1, 1)),
        (16, 32, (3, 3), (1, 1)),
    ]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 2  # 8x8 -> 4x4 -> 2x2
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32 * 2 * 2, 64), (64, 10)]
    assert model(torch.randn(5, 64)).shape == (5, 10)


@pytest.mark.parametrize(
    ("shape", "channels", "pools", "flat"),
    [
        ([1, 28, 28], [16, 32], 2, 32 * 7 * 7),
        ([1, 8, 8], [4, 4, 4, 4], 3, 4 * 1 * 1),  # pools stop at 1x1
        ([3, 5, 7], [6], 1, 6 * 2 * 3),
        ([2, 1, 9], [3, 3], 0, 3 * 1 * 9),  # a single row is never pooled
    ],
)
def test_cnn_pools_while_the_image_is_at_least_2x2(
    shape: list[int], channels: list[int], pools: int, flat: int
) -> None:
    spec = CnnSpec(input_shape=shape, channels=channels, hidden=[])
    n = shape[0] * shape[1] * shape[2]
    model = build_model(spec, n_features=n, n_classes=3)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == pools
    head = [m for m in model if isinstance(m, nn.Linear)]
    assert len(head) == 1 and head[0].in_features == flat
    assert model(torch.randn(2, n)).shape == (2, 3)


@pytest.mark.parametrize(
    ("shape", "channels", "message"),
    [
        ([1, 8, 7], [8], "input_shape 1x8x7 holds 56 values but the data has 64 feature columns"),
        (None, [8], "needs input_shape"),
        ([8, 8], [8], "needs input_shape"),
        ([1, 8, 8], [], "channel"),
    ],
)
def test_cnn_shape_errors_are_clear(shape: list[int] | None, channels: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(CnnSpec(input_shape=shape, channels=channels), n_features=64, n_classes=10)


def test_models_are_identical_from_the_same_seed() -> None:
    def make() -> nn.Sequential:
        torch.manual_seed(11)
        return build_model(CNN_8, 64, 10)

    a, b = make(), make()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_cnn_model_file_round_trip(tmp_path: Path) -> None:
    model = build_model(CNN_8, 64, 10)
    meta = ModelMetadata.for_spec(
        CNN_8, classes=[str(i) for i in range(10)], feature_names=[f"px{i}" for i in range(64)], label_column="digit"
    )
    path = tmp_path / "cnn.safetensors"
    save_model(model, path, meta)
    loaded, loaded_meta = load_model(path.read_bytes())
    assert loaded_meta == meta and loaded_meta.spec() == CNN_8
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model.eval()(x))
    # An MLP's metadata is as it always was: no cnn keys.
    mlp_meta = ModelMetadata.for_spec(MlpSpec(), classes=["a", "b"], feature_names=["x"], label_column="y")
    assert "kind" not in mlp_meta.to_strings() and mlp_meta.spec() == MlpSpec()


_SAVE_IN_A_FRESH_PROCESS = """
import hashlib, sys, torch
from swarmtrain.common.models import CnnSpec
from swarmtrain.training.model import ModelMetadata, build_model, model_bytes
torch.manual_seed(5)
spec = CnnSpec(input_shape=[1, 8, 8], channels=[4], hidden=[8])
model = build_model(spec, 64, 10)
names = [str(i) for i in range(64)]
meta = ModelMetadata.for_spec(spec, classes=list("0123456789"), feature_names=names, label_column="d")
sys.stdout.write(hashlib.sha256(model_bytes(model, meta)).hexdigest())
"""


def test_model_files_are_byte_identical_across_processes() -> None:
    # The safetensors library orders metadata by a per-process hash; our writer must not.
    torch.manual_seed(5)
    spec = CnnSpec(input_shape=[1, 8, 8], channels=[4], hidden=[8])
    model = build_model(spec, 64, 10)
    meta = ModelMetadata.for_spec(
        spec, classes=list("0123456789"), feature_names=[str(i) for i in range(64)], label_column="d"
    )
    here = hashlib.sha256(model_bytes(model, meta)).hexdigest()
    there = subprocess.run(
        [sys.executable, "-c", _SAVE_IN_A_FRESH_PROCESS], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert there == here


def test_cnn_sweep_learns_digits(digits_path: Path) -> None:
    job = TrainJob(
        csv_path=digits_path,
        label_column="digit",
        model=CNN_8,
        hyperparameters=Hyperparameters(epochs=3, batch_size=32, lr=2e-3),
        validation_split=0.2,
        seed=1,
        device="cpu",
        torch_threads=1,
    )
    result = train(job, lambda s: None, threading.Event())
    assert result.final.val_accuracy is not None and result.final.val_accuracy > 0.85  # chance: 0.1
    assert result.metadata.model == CNN_8 and result.metadata.model.kind == "cnn"


def test_a_cnn_that_does_not_fit_the_data_is_a_data_error(digits_path: Path) -> None:
    job = TrainJob(
        csv_path=digits_path,
        label_column="digit",
        model=CnnSpec(input_shape=[1, 28, 28]),
        hyperparameters=Hyperparameters(epochs=1, batch_size=32, lr=2e-3),
    )
    with pytest.raises(DataError, match="784 values but the data has 64"):
        train(job, lambda s: None, threading.Event())


# ------------------------------------------------------------------ local rounds


def _fedavg(shard: int, num_shards: int = 3, *, start_round: int = 1, spec: ModelSpec | None = None) -> Train:
    return Train(
        peer_id="p",
        session_id="s",
        dataset_uri="file:///unused",
        dataset_sha256="0" * 64,
        label_column="digit",
        model=spec or MlpSpec(hidden=[32]),
        hyperparameters=Hyperparameters(epochs=2, batch_size=32, lr=2e-3),
        validation_split=0.2,
        seed=4,
        output_uri="file:///unused",
        strategy="fedavg",
        shard=shard,
        num_shards=num_shards,
        rounds=3,
        start_round=start_round,
        rounds_uri="file:///rounds",
    )


def test_local_learners_start_identical_and_train_reproducibly(digits_path: Path) -> None:
    learners = [LocalLearner(digits_path, _fedavg(s), torch_threads=1) for s in range(3)]
    assert {state_bytes(learner.reference) for learner in learners} == {state_bytes(learners[0].reference)}
    assert sorted(learner.num_samples for learner in learners) == [479, 479, 480]  # 1438 training rows

    seen: list[EpochStats] = []
    stats = learners[1].train_round(2, seen.append, threading.Event())
    assert [(s.epoch, s.epochs) for s in seen] == [(3, 6), (4, 6)]
    assert stats.loss == seen[-1].loss and stats.accuracy == seen[-1].accuracy
    # Whoever trains shard 1 in round 2 from the same weights gets the same bytes.
    twin = LocalLearner(digits_path, _fedavg(1, start_round=2), torch_threads=1)
    twin.train_round(2, lambda s: None, threading.Event())
    assert state_bytes(twin.state()) == state_bytes(learners[1].state())
    assert state_bytes(learners[0].state()) != state_bytes(learners[1].state())


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU build of torch has no bf16 autocast")
def test_a_fedavg_round_runs_in_the_sessions_precision_and_says_so(digits_path: Path) -> None:
    bf16 = msgspec.structs.replace(_fedavg(0), precision="bf16")
    seen: list[EpochStats] = []
    LocalLearner(digits_path, bf16, torch_threads=1).train_round(1, seen.append, threading.Event())
    assert [s.precision for s in seen] == ["bf16", "bf16"]
    with pytest.raises(PrecisionUnsupported, match="fp16 needs a CUDA peer"):
        LocalLearner(digits_path, msgspec.structs.replace(_fedavg(0), precision="fp16"), torch_threads=1)


def test_local_rounds_improve_the_average(digits_path: Path) -> None:
    learners = [LocalLearner(digits_path, _fedavg(s, spec=CNN_8), torch_threads=1) for s in range(3)]
    before = learners[0].evaluate_val()[1]
    for r in (1, 2):
        for learner in learners:
            learner.train_round(r, lambda s: None, threading.Event())
        average = weighted_average([(str(i), lr.state(), lr.num_samples) for i, lr in enumerate(learners)])
        for learner in learners:
            learner.load(average)
    after = learners[0].evaluate_val()[1]
    assert before is not None and after is not None and after > max(0.5, before + 0.3)
    assert len({lr.model_file() for lr in learners}) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rounds_uri": ""}, "rounds_uri"),
        ({"start_round": 4}, "start_round"),
        ({"start_round": 0}, "start_round"),
        ({"shard": 3}, "shard 3 of 3"),
    ],
)
def test_impossible_fedavg_commands_are_refused(change: dict[str, object], message: str) -> None:
    import msgspec

    with pytest.raises(DataError, match=message):
        check_command(msgspec.structs.replace(_fedavg(0), **change))


# ------------------------------------------------------------------ a starting model (init_from, forks)


def test_a_starting_model_is_loaded_whole_and_one_that_does_not_fit_is_a_data_error() -> None:
    from swarmtrain.training.init import apply_init

    model = build_model(MlpSpec(hidden=[4]), 3, 2)
    init = {name: torch.full_like(t, 0.5) for name, t in build_model(MlpSpec(hidden=[4]), 3, 2).state_dict().items()}
    apply_init(model, init)
    assert all(torch.equal(t, init[name]) for name, t in model.state_dict().items())
    other = build_model(MlpSpec(hidden=[5]), 3, 2).state_dict()
    with pytest.raises(DataError, match="does not fit"):
        apply_init(model, other)
    assert all(torch.equal(t, init[name]) for name, t in model.state_dict().items())  # untouched


def test_a_corpus_shard_read_trains_exactly_as_the_whole_read(tmp_path: Path) -> None:
    """A fedavg peer on a corpus reads only its shard's windows and the validation ones, and
    starts, trains and measures bit for bit as a peer that read the whole corpus."""
    path = tmp_path / "story.text"
    path.write_text("".join(f"the {w} sat on mat number {i % 7}.\n" for i, w in enumerate(["cat", "dog"] * 150)))
    data = DataSpec(format="text", task="language_modeling", context=16)
    model = TransformerSpec(layers=1, d_model=16, heads=2, context=16)
    base = msgspec.structs.replace(_fedavg(1, 2, spec=model), label_column="text", data=data)
    whole = LocalLearner(path, msgspec.structs.replace(base, data_read="whole"), torch_threads=1)
    shard = LocalLearner(path, msgspec.structs.replace(base, data_read="shard"), torch_threads=1)
    assert state_bytes(whole.reference) == state_bytes(shard.reference)
    for a, b in ((whole.x_shard, shard.x_shard), (whole.y_shard, shard.y_shard), (whole.y_val, shard.y_val)):
        assert torch.equal(a, b)
    assert (whole.num_samples, whole.histograms, whole.metadata) == (
        shard.num_samples,
        shard.histograms,
        shard.metadata,
    )
    assert shard.x_train is None  # the training split is not held
    for learner in (whole, shard):
        learner.train_round(1, lambda _: None, threading.Event())
    assert whole.model_file() == shard.model_file()
    assert whole.evaluate_train() == pytest.approx(shard.evaluate_train())
    with pytest.raises(DataError, match="iid"):
        skewed = msgspec.structs.replace(
            base, data_read="shard", round_options=RoundOptions(sharding=ShardingSpec(name="label_skew"))
        )
        LocalLearner(path, skewed, torch_threads=1)
