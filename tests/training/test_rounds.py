"""One fedavg round as every peer applies it: decode, check, aggregate, outer step; and the walk a
newcomer (and replay-round) makes from round 1. Pure: updates are bytes in a dict."""

from __future__ import annotations

import itertools

import pytest
import torch

from swarmtrain.common.events import RoundClosed, RoundUpdate
from swarmtrain.common.fedopts import (
    AggregatorSpec,
    CompressionName,
    CompressionSpec,
    OuterSpec,
    RoundOptions,
    applied_rule,
    possible_rules,
)
from swarmtrain.training.averaging import average_round, sha256_hex, state_bytes
from swarmtrain.training.compression import encode_update
from swarmtrain.training.rounds import apply_round, replay_rounds, update_file

URI = "file:///r"


def _start(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor(7)}


def _local(start: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale if v.is_floating_point() else v for k, v in start.items()}


class Store(dict[str, bytes]):
    def fetch(self, update: RoundUpdate) -> bytes:
        return self[update.uri]

    def publish(self, r: int, peer: str, data: bytes, n: int = 100) -> RoundUpdate:
        uri = f"{URI}/{r}/{peer}.safetensors"
        self[uri] = data
        return RoundUpdate(peer_id=peer, uri=uri, sha256=sha256_hex(data), num_samples=n)


def _round(
    store: Store, r: int, start: dict[str, torch.Tensor], locals_: dict[str, dict[str, torch.Tensor]], method: str
) -> RoundClosed:
    updates = []
    for i, (peer, tensors) in enumerate(sorted(locals_.items())):
        m: CompressionName = method  # type: ignore[assignment]
        data = update_file(encode_update(tensors, start, m).payload, m)
        updates.append(store.publish(r, peer, data, 100 + i))
    return RoundClosed(session_id="s", round=r, updates=updates)


AGGREGATORS = [
    AggregatorSpec(name="mean"),
    AggregatorSpec(name="trimmed_mean", beta=0.2),
    AggregatorSpec(name="median"),
    AggregatorSpec(name="krum", f=1),
    AggregatorSpec(name="multi_krum", f=1),
]


@pytest.mark.parametrize("compression", ["none", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=lambda s: s.name)
def test_a_round_is_the_same_bits_for_any_order_of_the_named_updates(
    aggregator: AggregatorSpec, compression: CompressionName
) -> None:
    store, start = Store(), _start()
    closed = _round(store, 1, start, {f"p{i}": _local(start, i) for i in range(5)}, compression)
    options = RoundOptions(
        aggregator=aggregator, outer=OuterSpec(name="momentum"), compression=CompressionSpec(name=compression)
    )
    orders = [RoundClosed(session_id="s", round=1, updates=list(o)) for o in itertools.permutations(closed.updates)]
    results = [apply_round(order, store.fetch, start, start, {}, options, rounds_uri=URI) for order in orders[::23]]
    first = state_bytes(results[0].model)
    assert all(state_bytes(r.model) == first for r in results)
    assert all(state_bytes(r.state) == state_bytes(results[0].state) for r in results)
    assert results[0].aggregator == aggregator.name and not results[0].rejected
    assert results[0].update_bytes == sum(len(v) for v in store.values())
    if aggregator.name == "krum":
        assert len(results[0].selected) == 1
    elif aggregator.name == "multi_krum":
        assert len(results[0].selected) == 4
    else:
        assert results[0].selected == tuple(f"p{i}" for i in range(5))


def test_mean_without_compression_or_outer_step_is_todays_average_bit_for_bit() -> None:
    store, start = Store(), _start()
    closed = _round(store, 1, start, {f"p{i}": _local(start, i) for i in range(3)}, "none")
    today, rejected = average_round(closed, store.fetch, start, rounds_uri=URI)
    result = apply_round(closed, store.fetch, start, start, {}, RoundOptions(), rounds_uri=URI)
    assert today is not None and not rejected and result.aggregate is not None
    assert state_bytes(result.model) == state_bytes(today) == state_bytes(result.aggregate)


def test_compressed_updates_are_smaller_and_decode_near_the_weights() -> None:
    store, start = Store(), {**_start(), "big": torch.randn(64, 64, generator=torch.Generator().manual_seed(3))}
    local = _local(start, 1)
    sizes = {m: len(update_file(encode_update(local, start, m).payload, m)) for m in ("none", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["none"]
    closed = _round(store, 1, start, {"p": local}, "int8")
    result = apply_round(closed, store.fetch, start, start, {}, RoundOptions(compression=CompressionSpec(name="int8")))
    peak = float((local["w"] - start["w"]).abs().max())
    assert float((result.model["w"] - local["w"]).abs().max()) <= peak / 254 + 1e-6
    assert torch.equal(result.model["n"], start["n"])


def test_an_update_in_another_form_than_the_sessions_is_rejected() -> None:
    store, start = Store(), _start()
    closed = _round(store, 1, start, {"p0": _local(start, 0), "p1": _local(start, 1)}, "fp16")
    result = apply_round(closed, store.fetch, start, start, {}, RoundOptions(compression=CompressionSpec(name="int8")))
    assert result.aggregate is None and [p for p, _ in result.rejected] == ["p0", "p1"]
    assert "int8 scales" in result.rejected[0][1]
    assert state_bytes(result.model) == state_bytes(start)  # nothing acceptable: the start is kept


def test_the_norm_bound_is_measured_on_the_decoded_weights_from_the_rounds_start() -> None:
    store, start = Store(), _start()
    far = {k: v + 10.0 if v.is_floating_point() else v for k, v in start.items()}
    closed = _round(store, 1, start, {"far": far, "near": _local(start, 0)}, "int8")
    result = apply_round(
        closed,
        store.fetch,
        start,
        start,
        {},
        RoundOptions(compression=CompressionSpec(name="int8"), max_update_norm=5.0),
    )
    assert [p for p, _ in result.rejected] == ["far"] and "norm" in result.rejected[0][1]
    assert result.selected == ("near",)


def test_krum_with_too_few_acceptable_updates_falls_back_to_median_and_says_so() -> None:
    store, start = Store(), _start()
    locals_ = {f"p{i}": _local(start, i) for i in range(5)}
    locals_["p4"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in start.items()}
    closed = _round(store, 1, start, locals_, "none")
    spec = AggregatorSpec(name="krum", f=1)
    result = apply_round(closed, store.fetch, start, start, {}, RoundOptions(aggregator=spec))
    assert [p for p, _ in result.rejected] == ["p4"]
    assert result.aggregator == "median" == applied_rule(spec, 4).name and "median" in possible_rules(spec)
    assert possible_rules(AggregatorSpec(name="mean")) == {"mean"}


@pytest.mark.parametrize("outer", ["none", "momentum", "nesterov", "adam"])
def test_a_newcomer_rebuilds_model_and_outer_state_from_the_facts(outer: str) -> None:
    store, initial = Store(), _start()
    options = RoundOptions(
        aggregator=AggregatorSpec(name="median"),
        outer=OuterSpec(name=outer),  # type: ignore[arg-type]
        compression=CompressionSpec(name="bf16"),
    )
    weights, closed = initial, {}
    state: dict[str, torch.Tensor] = {}
    for r in range(1, 4):  # the peers that took part, round by round
        closed[r] = _round(store, r, weights, {f"p{i}": _local(weights, 10 * r + i) for i in range(3)}, "bf16")
        result = apply_round(closed[r], store.fetch, initial, weights, state, options, rounds_uri=URI)
        weights, state = result.model, result.state
    seen: list[int] = []
    rebuilt, rebuilt_state = replay_rounds(
        closed, 3, store.fetch, initial, options, rounds_uri=URI, on_round=lambda k, _: seen.append(k)
    )
    assert seen == [1, 2, 3]
    assert state_bytes(rebuilt) == state_bytes(weights) and state_bytes(rebuilt_state) == state_bytes(state)
    if outer != "none":  # the state matters: without it round 3 comes out otherwise
        fresh = apply_round(closed[3], store.fetch, initial, _after(store, closed, initial, options), {}, options)
        assert state_bytes(fresh.model) != state_bytes(weights)


def _after(
    store: Store, closed: dict[int, RoundClosed], initial: dict[str, torch.Tensor], options: RoundOptions
) -> dict[str, torch.Tensor]:
    weights, _ = replay_rounds({k: closed[k] for k in (1, 2)}, 2, store.fetch, initial, options)
    return weights


@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=lambda s: s.name)
def test_updates_fetched_and_checked_side_by_side_give_the_same_round_as_one_by_one(
    aggregator: AggregatorSpec,
) -> None:
    """``workers`` > 1 loads the updates in threads: the model, the rejections (in the order named,
    with their reasons), the selection and the bytes are those of loading them one by one."""
    store, start = Store(), _start()
    closed = _round(store, 1, start, {f"p{i}": _local(start, i) for i in range(5)}, "int8")
    liar = store.publish(1, "liar", b"not these bytes")
    liar = RoundUpdate(peer_id="liar", uri=liar.uri, sha256=sha256_hex(b"other bytes"), num_samples=5)
    missing = RoundUpdate(peer_id="gone", uri=f"{URI}/1/gone.safetensors", sha256="0" * 64, num_samples=5)
    again = RoundUpdate(peer_id="p1", uri=closed.updates[0].uri, sha256=closed.updates[0].sha256, num_samples=9)
    outside = RoundUpdate(peer_id="far", uri="file:///elsewhere/1/far.safetensors", sha256="0" * 64, num_samples=5)
    updates = [closed.updates[0], liar, *closed.updates[1:3], missing, again, outside, *closed.updates[3:]]
    closed = RoundClosed(session_id="s", round=1, updates=updates)
    fetched: list[str] = []

    def fetch(update: RoundUpdate) -> bytes:
        fetched.append(update.uri)
        if update.uri not in store:
            raise FileNotFoundError(update.uri)
        return store[update.uri]

    options = RoundOptions(
        aggregator=aggregator, outer=OuterSpec(name="adam"), compression=CompressionSpec(name="int8")
    )
    one = apply_round(closed, fetch, start, start, {}, options, rounds_uri=URI)
    fetched_one, fetched[:] = sorted(fetched), []
    spent: dict[str, float] = {}
    many = apply_round(closed, fetch, start, start, {}, options, rounds_uri=URI, workers=4, spent=spent)
    assert state_bytes(many.model) == state_bytes(one.model)
    assert state_bytes(many.state) == state_bytes(one.state)
    assert many.rejected == one.rejected
    assert [peer for peer, _ in one.rejected] == ["liar", "gone", "p1", "far"]
    assert (many.selected, many.aggregator, many.update_bytes) == (one.selected, one.aggregator, one.update_bytes)
    # the second update of p1 and the one outside the round's folder are never fetched, either way
    assert sorted(fetched) == fetched_one and outside.uri not in fetched and fetched.count(again.uri) == 1
    assert set(spent) == {"fetch", "verify", "average"} and all(v >= 0 for v in spent.values())


def test_a_fetch_failure_that_is_not_a_rejection_propagates_from_the_workers_too() -> None:
    store, start = Store(), _start()
    closed = _round(store, 1, start, {f"p{i}": _local(start, i) for i in range(3)}, "none")

    def fetch(update: RoundUpdate) -> bytes:
        if update.peer_id == "p1":
            raise ConnectionError("the store went away")
        return store[update.uri]

    for workers in (1, 3):
        with pytest.raises(ConnectionError):
            apply_round(closed, fetch, start, start, {}, RoundOptions(), rounds_uri=URI, workers=workers)
