"""A fedavg peer that reads only its shard (``Train.data_read`` ``shard``): the same rows as a peer
that reads everything, the starting weights replay rebuilds, and a parse cache keyed by content
and shard."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from swarmtrain.common.events import DataSpec, Hyperparameters, Train
from swarmtrain.common.fedopts import RoundOptions, ShardingSpec
from swarmtrain.common.models import MlpSpec
from swarmtrain.peer import trainer
from swarmtrain.peer.strategies.fedavg import LocalLearner
from swarmtrain.peer.trainer import PARSED, ShardJob, TrainJob, parse_shard
from swarmtrain.training.data import load, split_indices
from swarmtrain.training.init import initial_model, session_model
from tests.training import formatdata


def _command(shard: int, data_read: str, data: DataSpec, label: str, sharding: ShardingSpec | None = None) -> Train:
    return Train(
        peer_id="p",
        session_id="s",
        dataset_uri="file:///unused",
        dataset_sha256="0" * 64,
        label_column=label,
        model=MlpSpec(hidden=[16]),
        hyperparameters=Hyperparameters(epochs=1, batch_size=32, lr=2e-3),
        validation_split=0.2,
        seed=3,
        output_uri="file:///unused",
        strategy="fedavg",
        shard=shard,
        num_shards=4,
        rounds=2,
        start_round=1,
        rounds_uri="file:///rounds",
        data=data,
        data_read=data_read,  # type: ignore[arg-type]
        round_options=RoundOptions(sharding=sharding or ShardingSpec()),
    )


@pytest.fixture(params=["csv", "parquet", "npz"])
def dataset(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, DataSpec, str]:
    if request.param == "npz":
        path = tmp_path / "d.npz"
        path.write_bytes(formatdata.digits_npz())
        return path, DataSpec(format="npz"), "y"
    if request.param == "parquet":
        path = tmp_path / "t.parquet"
        path.write_bytes(formatdata.table_parquet(400, 3, row_group_size=50))
        return path, DataSpec(format="parquet"), "label"
    x, y = formatdata.table(400, 3)
    path = tmp_path / "t.csv"
    path.write_text(
        "a,b,c,d,label\n" + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]},{c}\n" for r, c in zip(x, y, strict=True))
    )
    return path, DataSpec(), "label"


@pytest.mark.parametrize("sharding", [ShardingSpec(), ShardingSpec(name="label_skew", alpha=0.3)])
def test_a_shard_reader_trains_the_rows_a_whole_reader_does(
    dataset: tuple[Path, DataSpec, str], sharding: ShardingSpec
) -> None:
    path, spec, label = dataset
    for k in (0, 2):
        shard = LocalLearner(path, _command(k, "shard", spec, label, sharding), torch_threads=1)
        whole = LocalLearner(path, _command(k, "whole", spec, label, sharding), torch_threads=1)
        assert torch.equal(shard.x_shard, whole.x_shard)
        assert torch.equal(shard.y_shard, whole.y_shard)
        assert torch.equal(shard.x_val, whole.x_val)
        assert torch.equal(shard.y_val, whole.y_val)
        assert (shard.num_samples, shard.histograms) == (whole.num_samples, whole.histograms)
        assert shard.metadata == whole.metadata
        assert shard.x_train is None  # the training split is not held: measured by a streamed pass
        loss, accuracy = shard.evaluate_train()
        held_loss, held_accuracy = whole.evaluate_train()
        assert loss is not None and held_loss is not None
        assert loss == pytest.approx(held_loss, rel=1e-5)
        assert accuracy == pytest.approx(held_accuracy, abs=1e-6)


def test_the_starting_weights_are_what_replay_rebuilds_for_the_sessions_data_read(
    dataset: tuple[Path, DataSpec, str],
) -> None:
    path, spec, label = dataset
    data = load(path, spec, label)
    train_idx, _ = split_indices(len(data), 0.2, 3)
    for data_read in ("shard", "whole"):
        learner = LocalLearner(path, _command(1, data_read, spec, label), torch_threads=1)
        rebuilt = session_model(MlpSpec(hidden=[16]), data, train_idx, 3, data_read)  # type: ignore[arg-type]
        expected = {name: t.detach() for name, t in rebuilt.state_dict().items()}
        assert learner.reference.keys() == expected.keys()
        assert all(torch.equal(learner.reference[n], expected[n]) for n in expected), data_read
    # the two rules agree to float precision; only a log's own rule gives its bits
    torch_fit = initial_model(MlpSpec(hidden=[16]), data, train_idx, 3)[0]
    streamed = session_model(MlpSpec(hidden=[16]), data, train_idx, 3, "shard")[0]
    assert torch.allclose(torch_fit.mean, streamed.mean, atol=1e-4)
    assert torch.allclose(torch_fit.std, streamed.std, rtol=1e-4)


def test_a_second_read_of_a_shard_is_a_hit_another_shard_or_content_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(formatdata.table_parquet(200, 3, row_group_size=40))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    job = TrainJob(
        csv_path=path,
        label_column="label",
        model=MlpSpec(hidden=[8]),
        hyperparameters=Hyperparameters(epochs=1, batch_size=16, lr=1e-3),
        seed=5,
        dataset_sha256=sha,
        data=DataSpec(format="parquet"),
    )
    reads: list[int] = []
    real = trainer.read_shard

    def counted(*args: object, **kwargs: object) -> object:
        reads.append(int(kwargs["shard"]))  # type: ignore[call-overload]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    before = PARSED.stats()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "read_shard", counted)
        first = parse_shard(job, ShardJob(shard=1, num_shards=3))
        again = parse_shard(job, ShardJob(shard=1, num_shards=3))
        other = parse_shard(job, ShardJob(shard=2, num_shards=3))
        skewed = parse_shard(job, ShardJob(shard=1, num_shards=3, sharding=ShardingSpec(name="label_skew")))
        reseeded = parse_shard(replace(job, seed=6), ShardJob(shard=1, num_shards=3))
        other_content = parse_shard(replace(job, dataset_sha256="f" * 64), ShardJob(shard=1, num_shards=3))
    after = PARSED.stats()
    assert again is first  # the cached value itself
    assert reads == [1, 2, 1, 1, 1]  # every other shard, sharding, seed or content was read
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 5)
    assert not torch.equal(other.rows, first.rows) and not torch.equal(skewed.rows, first.rows)
    assert not torch.equal(reseeded.rows, first.rows)
    assert torch.equal(other_content.x, first.x)  # same bytes here, but keyed by the sha256 it was given
    assert trainer.shard_key(job, ShardJob(shard=1, num_shards=3)) != trainer.dataset_key(job)
