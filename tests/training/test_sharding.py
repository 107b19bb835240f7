"""Shards: iid is today's split; label_skew is deterministic, a partition, and skewed as alpha says."""

from __future__ import annotations

import msgspec
import pytest
import torch

from swarmtrain.common.fedopts import ShardingSpec
from swarmtrain.training.data import DataError, shard_indices, split_indices
from swarmtrain.training.sharding import histograms, iid, label_skew, make_shards

N, CLASSES = 1000, 10
LABELS = torch.arange(N, dtype=torch.int64) % CLASSES
TRAIN, _ = split_indices(N, 0.2, seed=7)


def _skew(hists: list[list[int]]) -> float:
    """Mean total-variation distance between each shard's label distribution and the whole's."""
    total = torch.tensor(hists, dtype=torch.float64).sum(0)
    whole = total / total.sum()
    dists = [0.5 * float((torch.tensor(h, dtype=torch.float64) / sum(h) - whole).abs().sum()) for h in hists]
    return sum(dists) / len(dists)


def _is_partition(shards: list[torch.Tensor]) -> bool:
    joined = torch.cat(shards)
    return len(set(joined.tolist())) == len(joined) and sorted(joined.tolist()) == sorted(TRAIN.tolist())


def test_iid_is_todays_split() -> None:
    result = iid(TRAIN, LABELS, 4, seed=3)
    for k in range(4):
        assert torch.equal(result.shards[k], shard_indices(TRAIN, 4, k, 3))
    assert result.histograms == histograms(LABELS, result.shards, CLASSES)
    assert [sum(h) for h in result.histograms] == [200, 200, 200, 200]


def test_label_skew_is_deterministic_from_the_seed_and_a_partition() -> None:
    a = label_skew(TRAIN, LABELS, 4, seed=11, alpha=0.5)
    b = label_skew(TRAIN, LABELS, 4, seed=11, alpha=0.5)
    c = label_skew(TRAIN, LABELS, 4, seed=12, alpha=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.shards, b.shards, strict=True))
    assert a.histograms == b.histograms
    assert a.histograms != c.histograms
    assert _is_partition(a.shards) and all(len(s) for s in a.shards)
    assert a.histograms == histograms(LABELS, a.shards, CLASSES)
    assert all(s.dtype == torch.int64 for s in a.shards)


def test_small_alpha_is_more_skewed_than_large() -> None:
    for seed in range(3):
        skewed = _skew(label_skew(TRAIN, LABELS, 4, seed=seed, alpha=0.1).histograms)
        even = _skew(label_skew(TRAIN, LABELS, 4, seed=seed, alpha=100.0).histograms)
        assert skewed > 0.4 > 0.1 > even, (seed, skewed, even)


def test_make_shards_dispatches_by_spec() -> None:
    assert make_shards(ShardingSpec(), TRAIN, LABELS, 2, 1).histograms == iid(TRAIN, LABELS, 2, 1).histograms
    spec = ShardingSpec(name="label_skew", alpha=0.3)
    assert make_shards(spec, TRAIN, LABELS, 3, 1).histograms == label_skew(TRAIN, LABELS, 3, 1, 0.3).histograms


def test_impossible_shardings_are_refused() -> None:
    with pytest.raises(DataError, match="leave a shard empty"):
        label_skew(TRAIN[:3], LABELS, 4, seed=0, alpha=1.0)
    with pytest.raises(DataError, match="alpha"):
        label_skew(TRAIN, LABELS, 4, seed=0, alpha=0.0)
    for bad in (b'{"name": "label_skew", "alpha": 0}', b'{"name": "dirichlet"}'):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.Decoder(ShardingSpec).decode(bad)
