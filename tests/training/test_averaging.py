"""fedavg averaging and deterministic safetensors bytes: plain function calls, no network."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from swarmtrain.common.blob import BlobNotFound
from swarmtrain.common.events import RoundClosed, RoundUpdate
from swarmtrain.training import tensorfile
from swarmtrain.training.averaging import (
    WEIGHTS_FORMAT,
    UpdateUnavailable,
    average_round,
    check_update,
    l2_distance,
    state_bytes,
    weighted_average,
)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "0.mean": torch.randn(4, generator=g),
        "1.weight": torch.randn(3, 4, generator=g),
        "1.bias": torch.randn(3, generator=g),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


REFERENCE = _state(0)


# ------------------------------------------------------------------ weighted_average


def test_weighted_mean_matches_a_hand_computation() -> None:
    a = {"w": torch.tensor([1.0, 2.0, -4.0]), "n": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 0.0, 8.0]), "n": torch.tensor([9])}
    avg = weighted_average([("pb", b, 3), ("pa", a, 1)])
    # (1*a + 3*b) / 4
    assert avg["w"].tolist() == [2.5, 0.5, 5.0]
    assert avg["w"].dtype == torch.float32
    assert avg["n"].tolist() == [7]  # non-float: taken from the first by peer id ("pa")


def test_weighted_mean_keeps_each_dtype_and_is_exact_for_equal_tensors() -> None:
    x = torch.randn(50) * 1e3
    updates = [(f"p{i}", {"x": x, "h": x.half(), "b": x.bfloat16()}, n) for i, n in enumerate([3, 7, 11, 1])]
    avg = weighted_average(updates)  # type: ignore[arg-type]
    assert avg["x"].dtype == torch.float32 and avg["h"].dtype == torch.float16 and avg["b"].dtype == torch.bfloat16
    # The same tensor everywhere (a Standardize buffer) averages to itself, bit for bit.
    assert torch.equal(avg["x"], x) and torch.equal(avg["h"], x.half()) and torch.equal(avg["b"], x.bfloat16())


def test_average_is_bit_identical_in_any_order() -> None:
    updates = [(f"peer-{i}", _state(i), n) for i, n in enumerate([101, 57, 380, 12])]
    expected = state_bytes(weighted_average(updates))  # type: ignore[arg-type]
    for perm in itertools.permutations(updates):
        assert state_bytes(weighted_average(list(perm))) == expected  # type: ignore[arg-type]


def test_average_refuses_duplicates_nonpositive_weights_and_nothing() -> None:
    with pytest.raises(ValueError, match="nothing"):
        weighted_average([])
    with pytest.raises(ValueError, match="more than one"):
        weighted_average([("a", _state(1), 1), ("a", _state(2), 1)])
    with pytest.raises(ValueError, match="num_samples"):
        weighted_average([("a", _state(1), 0)])


# ------------------------------------------------------------------ check_update


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("1.bias"), "missing '1.bias'"),
        (lambda s: s.update({"extra": torch.zeros(1)}), "unexpected 'extra'"),
        (lambda s: s.update({"1.weight": torch.zeros(4, 3)}), "shape [4, 3], the model's is [3, 4]"),
        (lambda s: s.update({"1.bias": torch.zeros(3, dtype=torch.float64)}), "dtype float64, the model's is float32"),
        (lambda s: s.update({"1.bias": torch.tensor([0.0, float("nan"), 1.0])}), "NaN or Inf"),
        (lambda s: s.update({"0.mean": torch.tensor([0.0, 1.0, float("-inf"), 1.0])}), "NaN or Inf"),
    ],
)
def test_check_update_rejects(change: object, message: str) -> None:
    tensors = _state(3)
    change(tensors)  # type: ignore[operator]
    reason = check_update(tensors, REFERENCE)
    assert reason is not None and message in reason


def test_check_update_accepts_a_matching_state() -> None:
    assert check_update(_state(5), REFERENCE) is None


# ------------------------------------------------------------------ average_round


class Blobs:
    """A fetch over an in-memory store: ``uri -> bytes``."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.fetched: list[str] = []

    def put(
        self, peer_id: str, data: bytes, n: int = 10, sha256: str | None = None, round_: int = 1, name: str = ""
    ) -> RoundUpdate:
        uri = f"mem://rounds/{round_}/{name or peer_id}.safetensors"
        self.objects[uri] = data
        return RoundUpdate(peer_id=peer_id, uri=uri, sha256=sha256 or hashlib.sha256(data).hexdigest(), num_samples=n)

    def fetch(self, update: RoundUpdate) -> bytes:
        self.fetched.append(update.uri)
        try:
            return self.objects[update.uri]
        except KeyError:
            raise BlobNotFound(update.uri) from None


def _closed(*updates: RoundUpdate, round_: int = 1) -> RoundClosed:
    return RoundClosed(session_id="s", round=round_, updates=list(updates))


def test_average_round_averages_the_acceptable_and_names_the_rest() -> None:
    blobs = Blobs()
    good_a, good_b = _state(1), _state(2)
    nan = _state(3)
    nan["1.weight"][0, 0] = float("nan")
    wrong_shape = {**_state(4), "1.bias": torch.zeros(5)}
    updates = [
        blobs.put("a", state_bytes(good_a), n=30),
        blobs.put("nan", state_bytes(nan)),
        blobs.put("bent", state_bytes(wrong_shape)),
        blobs.put("liar", state_bytes(_state(5)), sha256="0" * 64),
        blobs.put("junk", b"definitely not safetensors"),
        blobs.put("zero", state_bytes(_state(6)), n=0),
        RoundUpdate(peer_id="gone", uri="mem://rounds/1/gone.safetensors", sha256="0" * 64, num_samples=5),
        blobs.put("b", state_bytes(good_b), n=10),
        blobs.put("a", state_bytes(_state(7)), n=10, name="a-again"),  # a second one from "a"
    ]
    average, rejected = average_round(_closed(*updates), blobs.fetch, REFERENCE)
    assert average is not None
    assert state_bytes(average) == state_bytes(weighted_average([("a", good_a, 30), ("b", good_b, 10)]))
    reasons = dict(rejected)
    assert [peer for peer, _ in rejected] == ["nan", "bent", "liar", "junk", "zero", "gone", "a"]
    assert "NaN or Inf" in reasons["nan"]
    assert "shape" in reasons["bent"]
    assert reasons["liar"] == "sha256 mismatch"
    assert "not a safetensors file" in reasons["junk"]
    assert "num_samples" in reasons["zero"]
    assert "not available" in reasons["gone"]
    assert rejected[-1] == ("a", "a second update from the same peer in one round")


def test_the_norm_bound_rejects_an_update_too_far_from_the_round_start() -> None:
    blobs = Blobs()
    start = _state(1)
    near = {name: t + 0.01 if t.is_floating_point() else t for name, t in start.items()}
    far = {name: t * 1000 if t.is_floating_point() else t for name, t in start.items()}
    updates = [blobs.put("near", state_bytes(near), n=5), blobs.put("far", state_bytes(far), n=10**6)]
    bound = 1.0
    assert l2_distance(near, start) < bound < l2_distance(far, start)
    average, rejected = average_round(_closed(*updates), blobs.fetch, REFERENCE, start=start, max_norm=bound)
    assert average is not None and state_bytes(average) == state_bytes(near)
    [(peer, reason)] = rejected
    assert peer == "far" and "norm" in reason and "exceeds the bound 1" in reason
    # no bound, no rejection: the bound is the session's choice
    unbounded, none = average_round(_closed(*updates), blobs.fetch, REFERENCE, start=start)
    assert unbounded is not None and none == []


def test_l2_distance_is_exact_and_independent_of_tensor_order() -> None:
    a = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([[4.0]]), "n": torch.tensor([9])}
    b = {"y": torch.zeros(1, 1), "x": torch.zeros(2), "n": torch.tensor([1])}
    assert l2_distance(a, b) == 5.0  # integer tensors are not weights: not measured
    big = {"x": torch.randn(10_000, generator=torch.Generator().manual_seed(1))}
    zero = {"x": torch.zeros(10_000)}
    assert l2_distance(big, zero) == l2_distance(zero, big) > 0


def test_average_round_order_of_naming_does_not_matter() -> None:
    blobs = Blobs()
    updates = [blobs.put(f"p{i}", state_bytes(_state(i)), n=10 + i) for i in range(4)]
    first, _ = average_round(_closed(*updates), blobs.fetch, REFERENCE)
    again, _ = average_round(_closed(*reversed(updates)), blobs.fetch, REFERENCE)
    assert first is not None and again is not None
    assert state_bytes(first) == state_bytes(again)


def test_average_round_with_nothing_acceptable_is_none() -> None:
    blobs = Blobs()
    nan = _state(1)
    nan["1.bias"][:] = float("inf")
    updates = [blobs.put("x", state_bytes(nan)), blobs.put("y", state_bytes(_state(2)), sha256="f" * 64)]
    average, rejected = average_round(_closed(*updates), blobs.fetch, REFERENCE)
    assert average is None
    assert [peer for peer, _ in rejected] == ["x", "y"]
    assert average_round(_closed(), blobs.fetch, REFERENCE) == (None, [])


def test_average_round_rejects_unavailable_and_foreign_uris_without_fetching() -> None:
    blobs = Blobs()
    inside = blobs.put("a", state_bytes(_state(1)), round_=2)
    elsewhere = blobs.put("b", state_bytes(_state(2)), round_=1)  # round 1's folder, named in round 2

    def fetch(update: RoundUpdate) -> bytes:
        if update.peer_id == "c":
            raise UpdateUnavailable("larger than 10 bytes")
        return blobs.fetch(update)

    big = RoundUpdate(peer_id="c", uri="mem://rounds/2/c.safetensors", sha256="0" * 64, num_samples=1)
    average, rejected = average_round(
        _closed(inside, elsewhere, big, round_=2), fetch, REFERENCE, rounds_uri="mem://rounds"
    )
    assert average is not None
    assert rejected == [
        ("b", "uri is outside the session's folder for this round"),
        ("c", "update not available: larger than 10 bytes"),
    ]
    assert elsewhere.uri not in blobs.fetched


def test_other_fetch_errors_propagate() -> None:
    def fetch(update: RoundUpdate) -> bytes:
        raise ConnectionError("store down")

    update = RoundUpdate(peer_id="a", uri="mem://x", sha256="0" * 64, num_samples=1)
    with pytest.raises(ConnectionError):
        average_round(_closed(update), fetch, REFERENCE)


# ------------------------------------------------------------------ bytes


def test_state_bytes_are_a_fixed_function_of_the_tensors() -> None:
    state = _state(1)
    data = state_bytes(state)
    assert state_bytes(dict(reversed(list(state.items())))) == data
    assert state_bytes({k: v.clone() for k, v in state.items()}) == data
    loaded = st_load(data)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert tensorfile.read_metadata(data) == {"format": WEIGHTS_FORMAT}


def test_tensorfile_sorts_metadata_and_matches_the_library_layout() -> None:
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int8)}
    tensors |= {"e": torch.zeros(0, 3), "s": torch.tensor(3.5, dtype=torch.float64), "m": torch.tensor([True])}
    meta = {"zeta": "1", "alpha": "2", "mid": "3"}
    data = tensorfile.dumps(tensors, meta)
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(data[8 : 8 + n])
    assert list(header["__metadata__"]) == ["alpha", "mid", "zeta"]
    assert tensorfile.dumps(dict(reversed(list(tensors.items()))), dict(reversed(list(meta.items())))) == data
    loaded = tensorfile.loads(data)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    # The library reads what it writes and what we write alike; only its metadata order may vary.
    assert {k: v.tolist() for k, v in st_load(st_save(tensors, metadata=meta)).items()} == {
        k: v.tolist() for k, v in loaded.items()
    }


def test_tensorfile_refuses_unsupported_dtypes() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        tensorfile.dumps({"c": torch.zeros(2, dtype=torch.complex64)})
