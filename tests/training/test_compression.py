"""Update compression: byte counts, round-trip error bounds, deterministic decoding, checked payloads."""

from __future__ import annotations

import msgspec
import pytest
import torch

from swarmtrain.common.fedopts import CompressionSpec
from swarmtrain.training import tensorfile
from swarmtrain.training.compression import (
    METHODS,
    SCALE_PREFIX,
    check_payload,
    compress,
    decode_update,
    decompress,
    encode_update,
)


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "0.mean": torch.randn(16, generator=g),
        "1.weight": torch.randn(32, 16, generator=g),
        "1.bias": torch.randn(32, generator=g),
        "steps": torch.tensor([3], dtype=torch.int64),
    }


START = _model(0)
LOCAL = {k: (v + 0.01 * _model(1)[k]) if v.is_floating_point() else v for k, v in START.items()}
FLOATS = 16 + 32 * 16 + 32


def test_byte_counts_per_method() -> None:
    sizes = {m: encode_update(LOCAL, START, m).nbytes for m in METHODS}
    assert sizes == {
        "none": FLOATS * 4 + 8,
        "fp16": FLOATS * 2 + 8,
        "bf16": FLOATS * 2 + 8,
        "int8": FLOATS + 3 * 4 + 8,  # one float32 scale per float tensor
    }


def test_none_publishes_todays_weights_unchanged() -> None:
    enc = encode_update(LOCAL, START, "none")
    assert all(torch.equal(enc.payload[k], LOCAL[k]) for k in LOCAL)
    back = decode_update(enc.payload, START, "none")
    assert all(torch.equal(back[k], LOCAL[k]) and back[k].dtype == LOCAL[k].dtype for k in LOCAL)


@pytest.mark.parametrize(("method", "rel"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_round_trip_error_is_within_half_an_ulp(method: str, rel: float) -> None:
    x = {"w": torch.randn(1000, dtype=torch.float64) * 0.01}
    back = decompress(compress(x, method).payload, method)  # type: ignore[arg-type]
    # 1.001: a conversion through float32 may round twice
    assert bool(((back["w"] - x["w"]).abs() <= x["w"].abs() * rel * 1.001 + 2.0**-25).all())


def test_int8_round_trip_error_is_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(5)
    x = {"w": torch.randn(4096, generator=g, dtype=torch.float64) * 0.03, "z": torch.zeros(4, dtype=torch.float64)}
    enc = compress(x, "int8")
    assert enc.payload["w"].dtype == torch.int8 and int(enc.payload["w"].abs().max()) == 127
    back = decompress(enc.payload, "int8")
    step = float(x["w"].abs().max()) / 127
    assert float((back["w"] - x["w"]).abs().max()) <= step / 2 * (1 + 1e-6)
    assert torch.equal(back["z"], x["z"])  # an all-zero tensor: scale 0, exactly zero back


@pytest.mark.parametrize("method", METHODS)
def test_decoding_is_deterministic_and_survives_the_wire(method: str) -> None:
    enc = encode_update(LOCAL, START, method)  # type: ignore[arg-type]
    wire = tensorfile.loads(tensorfile.dumps(enc.payload))
    assert check_payload(wire, START, method) is None  # type: ignore[arg-type]
    a = decode_update(wire, START, method)  # type: ignore[arg-type]
    b = decode_update(tensorfile.loads(tensorfile.dumps(enc.payload)), START, method)  # type: ignore[arg-type]
    for k in START:
        assert a[k].dtype == START[k].dtype
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes()
    err = max(float((a[k] - LOCAL[k]).abs().max()) for k in START if START[k].is_floating_point())
    assert err <= {"none": 0.0, "fp16": 1e-4, "bf16": 1e-3, "int8": 1e-3}[method]
    assert torch.equal(a["steps"], LOCAL["steps"])


def test_fp16_refuses_a_delta_beyond_its_range_and_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="fp16's range"):
        compress({"w": torch.tensor([1e6])}, "fp16")
    assert compress({"w": torch.tensor([1e6])}, "bf16").payload["w"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="NaN"):
        compress({"w": torch.tensor([float("nan")])}, "int8")


def test_bad_payloads_are_explained() -> None:
    good = encode_update(LOCAL, START, "int8").payload
    assert check_payload(good, START, "int8") is None
    no_scale = {k: v for k, v in good.items() if k != SCALE_PREFIX + "1.bias"}
    assert "scales" in (check_payload(no_scale, START, "int8") or "")
    neg = {**good, SCALE_PREFIX + "1.bias": torch.tensor(-1.0)}
    assert "non-negative" in (check_payload(neg, START, "int8") or "")
    wrong_dtype = {**good, "1.weight": good["1.weight"].float()}
    assert "dtype" in (check_payload(wrong_dtype, START, "int8") or "")
    half = encode_update(LOCAL, START, "fp16").payload
    assert "dtype" in (check_payload(half, START, "bf16") or "")
    assert "unexpected scale" in (check_payload(good, START, "fp16") or "")
    inf = {**half, "1.bias": torch.full((32,), float("inf"), dtype=torch.float16)}
    assert "NaN or Inf" in (check_payload(inf, START, "fp16") or "")


def test_spec_decodes_only_known_methods() -> None:
    decode = msgspec.json.Decoder(CompressionSpec).decode
    assert decode(b'{"name": "int8"}').name == "int8"
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"name": "int4"}')
