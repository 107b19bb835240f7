"""fedavg peers with a session's round options, against a real nats-server, the test playing the
scheduler's part (see ``test_fedavg_service``): compressed deltas, a robust aggregator, an outer
optimizer whose state a newcomer rebuilds from the facts, label-skewed shards, a kept optimizer."""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import torch
from nats.aio.client import Client as NATS

from swarmtrain.common.events import DataSpec, PeerDone, RoundAveraged, Train
from swarmtrain.common.fedopts import (
    AggregatorSpec,
    CompressionSpec,
    OuterSpec,
    RoundOptions,
    ShardingSpec,
    resolve_outer,
)
from swarmtrain.common.settings import Settings
from swarmtrain.peer.strategies.fedavg import LocalLearner
from swarmtrain.training.averaging import sha256_hex, state_bytes
from swarmtrain.training.data import load, split_indices
from swarmtrain.training.rounds import replay_rounds
from swarmtrain.training.sharding import make_shards
from tests.peer.helpers import SchedulerPart, reports
from tests.peer.test_fedavg_service import close_round, fedavg_command, fetch, named, peers, read_uri, updates_of

OPTIONS = {
    "aggregator": AggregatorSpec(name="median"),
    "outer": resolve_outer(OuterSpec(name="momentum")),
    "compression": CompressionSpec(name="int8"),
    "sharding": ShardingSpec(name="label_skew", alpha=0.5),
}


def with_options(train: Train, **extra: object) -> Train:
    return msgspec.structs.replace(train, round_options=RoundOptions(**OPTIONS), **extra)  # type: ignore[arg-type]


async def test_compressed_median_momentum_on_skewed_shards_every_peer_and_a_newcomer_agree(
    settings: Settings, nc: NATS, blob_dir: Path, digits_sha256: str, scheduler: SchedulerPart
) -> None:
    js = nc.jetstream()
    sid = "opts"
    csv = blob_dir / "datasets" / "digits.csv"
    async with peers(settings, js, "alpha", "beta", "gamma") as ids, reports(js, sid) as session:
        alpha, beta, gamma = ids
        trains = {}
        for shard, peer_id in enumerate((alpha, beta)):
            plain = fedavg_command(peer_id, blob_dir, sid, sha256=digits_sha256, shard=shard, num_shards=2, rounds=2)
            trains[peer_id] = await scheduler.train(with_options(plain))
        ups = await updates_of(session, 1, [alpha, beta])
        closed1 = await close_round(scheduler, [alpha, beta], sid, 1, named(*ups.values()))
        [avg1] = await session.collect(RoundAveraged, lambda e: e.round == 1)

        # The shards are the label-skewed ones, with their own sizes (not the equal iid cut).
        data = load(csv, DataSpec(), "digit")
        train_idx, _ = split_indices(len(data), 0.2, 7)
        skewed = make_shards(OPTIONS["sharding"], train_idx, data.labels, 2, 7)  # type: ignore[arg-type]
        assert [ups[p].num_samples for p in (alpha, beta)] == [len(s) for s in skewed.shards]
        assert ups[alpha].num_samples != len(train_idx) // 2
        # The updates travel as int8 deltas; the round's fact names the rule, the selection, the bytes.
        learner = LocalLearner(csv, trains[alpha])
        full = len(state_bytes(learner.reference))
        assert all(u.nbytes == len(read_uri(u.uri)) and u.nbytes < full / 3 for u in ups.values())
        assert avg1.aggregator == "median" and avg1.selected == sorted((alpha, beta))
        assert avg1.update_bytes == sum(u.nbytes for u in ups.values())
        # Anyone recomputes the round from the facts, the blobs and the initial weights, bit for bit.
        model1, _ = replay_rounds({1: closed1}, 1, fetch, learner.reference, trains[alpha].round_options)
        assert sha256_hex(state_bytes(model1)) == avg1.sha256 == sha256_hex(read_uri(avg1.uri))

        # gamma takes beta's shard over for round 2: it rebuilds round 1's model AND the momentum
        # from the facts, so it trains and publishes the very bytes beta does.
        await scheduler.forward([gamma], closed1)
        late = fedavg_command(
            gamma, blob_dir, sid, sha256=digits_sha256, shard=1, num_shards=2, rounds=2, start_round=2
        )
        await scheduler.train(with_options(late))
        round2 = await updates_of(session, 2, ids)
        assert round2[gamma].sha256 == round2[beta].sha256

        await close_round(scheduler, ids, sid, 2, named(round2[alpha], round2[gamma]), left_out=[beta])
        done = await session.collect(PeerDone, count=2)
        assert {d.peer_id for d in done} == {alpha, gamma} and done[0].model_sha256 == done[1].model_sha256
        assert done[0].val_accuracy is not None and done[0].val_accuracy > 0.5


def test_a_kept_local_optimizer_carries_its_state_into_the_next_round(digits_path: Path, tmp_path: Path) -> None:
    plain = fedavg_command("p", tmp_path, "s", sha256="0" * 64, shard=0, num_shards=2, rounds=2)

    def second_round(keep: bool) -> dict[str, torch.Tensor]:
        learner = LocalLearner(
            digits_path, msgspec.structs.replace(plain, round_options=RoundOptions(keep_local_optimizer=keep))
        )
        start = learner.state()
        learner.train_round(1, lambda _: None, threading.Event())
        learner.load(start)  # as if the round's average were the start again
        learner.train_round(2, lambda _: None, threading.Event())
        return learner.state()

    kept, fresh = second_round(True), second_round(False)
    assert state_bytes(kept) == state_bytes(second_round(True))  # still deterministic
    assert state_bytes(kept) != state_bytes(fresh)  # Adam's moments from round 1 moved round 2 otherwise
    assert {t.dtype for t in kept.values()} == {t.dtype for t in fresh.values()}
