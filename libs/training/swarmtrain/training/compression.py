"""Update compression: what a peer publishes instead of its whole float32 weights.

``none`` publishes the weights themselves, as today (so today's bytes and hashes do not change).
The lossy methods publish the *delta* from the round's start, which every receiver holds: in
``fp16`` or ``bf16``, or in ``int8`` with one float32 scale per tensor (``q = round(x / s)``,
``s = max|x| / 127``, rounding half to even). Receivers rebuild ``start + delta`` in float64 and cast
once, so decompression is a pure function of (payload, start): the same bytes on every peer.

The payload is a flat ``dict[str, torch.Tensor]`` for :func:`tensorfile.dumps`; an int8 tensor's
scale travels as the float32 scalar ``scale/<name>``. Non-float tensors travel as they are. A
payload comes from another machine: :func:`check_payload` says why one cannot be decoded.

Round-trip error per element, for a delta ``x`` of a tensor: fp16 ``|x| * 2**-11`` (for
``|x| >= 2**-14``; absolute ``2**-25`` below); bf16 ``|x| * 2**-8``; int8 ``max|x| / 254`` (plus
float32 rounding of the scale). An fp16 delta beyond fp16's range (65504) is refused at compress.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from swarmtrain.common.fedopts import CompressionName, CompressionSpec
from swarmtrain.training.averaging import Tensors, check_update

SCALE_PREFIX = "scale/"
INT8_LEVELS = 127
_HALF: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
METHODS: tuple[CompressionName, ...] = ("none", "fp16", "bf16", "int8")

__all__ = [
    "METHODS",
    "CompressionSpec",
    "Encoded",
    "check_payload",
    "compress",
    "decode_update",
    "decompress",
    "encode_update",
    "payload_bytes",
]


@dataclass(frozen=True)
class Encoded:
    payload: Tensors
    nbytes: int
    """The payload's tensor bytes (what the safetensors file holds besides its header)."""


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


def compress(tensors: Mapping[str, torch.Tensor], method: CompressionName) -> Encoded:
    """``tensors`` (a delta) in ``method``'s form. ``none`` copies them unchanged.

    Raises ValueError for a non-finite value, or one out of fp16's range.
    """
    payload: Tensors = {}
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        if name.startswith(SCALE_PREFIX):
            raise ValueError(f"tensor name {name!r} is reserved for int8 scales")
        if method == "none" or not t.is_floating_point():
            payload[name] = t.clone()
            continue
        x = t.to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"tensor {name!r} holds NaN or Inf")
        if method in _HALF:
            half = x.to(_HALF[method])
            if not bool(torch.isfinite(half).all()):
                raise ValueError(f"tensor {name!r} has a value beyond {method}'s range")
            payload[name] = half
        elif method == "int8":
            peak = float(x.abs().max()) if x.numel() else 0.0
            scale = torch.tensor(peak / INT8_LEVELS, dtype=torch.float32)
            s = float(scale)
            q = torch.zeros_like(x) if s == 0.0 else torch.round(x / s).clamp(-INT8_LEVELS, INT8_LEVELS)
            payload[name] = q.to(torch.int8)
            payload[SCALE_PREFIX + name] = scale
        else:
            raise ValueError(f"unknown compression {method!r}")
    return Encoded(payload, payload_bytes(payload))


def decompress(payload: Mapping[str, torch.Tensor], method: CompressionName) -> Tensors:
    """The float64 tensors a payload stands for (non-float ones as they are); deterministic."""
    out: Tensors = {}
    for name in sorted(payload):
        if name.startswith(SCALE_PREFIX):
            continue
        t = payload[name].detach().to("cpu")
        if method == "int8" and t.dtype == torch.int8:
            out[name] = t.to(torch.float64) * float(payload[SCALE_PREFIX + name])
        elif t.is_floating_point():
            out[name] = t.to(torch.float64)
        else:
            out[name] = t.clone()
    return out


def encode_update(
    local: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], method: CompressionName
) -> Encoded:
    """What a peer publishes for its round: ``local`` itself for ``none``, else its delta from
    ``start`` (in float64) compressed. Non-float tensors travel as ``local`` has them."""
    if method == "none":
        return compress(local, "none")
    delta: Tensors = {}
    for name in sorted(local):
        t = local[name]
        if t.is_floating_point():
            delta[name] = t.detach().to("cpu", torch.float64) - start[name].detach().to("cpu", torch.float64)
        else:
            delta[name] = t.detach().to("cpu")
    return compress(delta, method)


def decode_update(
    payload: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], method: CompressionName
) -> Tensors:
    """The weights a payload stands for: ``start + delta`` in float64, cast to each of ``start``'s
    dtypes (``none``: the payload itself). Call :func:`check_payload` on untrusted payloads first."""
    if method == "none":
        return {name: payload[name].detach().to("cpu").clone() for name in sorted(payload)}
    delta = decompress(payload, method)
    out: Tensors = {}
    for name in sorted(start):
        ref = start[name]
        if ref.is_floating_point():
            out[name] = (ref.detach().to("cpu", torch.float64) + delta[name]).to(ref.dtype)
        else:
            out[name] = delta[name]
    return out


def check_payload(
    payload: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], method: CompressionName
) -> str | None:
    """Why ``payload`` is not a ``method`` encoding of a model shaped like ``reference``; None if it is.

    Names and shapes must be the reference's, dtypes the method's (int8 tensors with a finite,
    non-negative float32 scalar scale each), float values finite.
    """
    if method == "none":
        return check_update(payload, reference)
    scales = {name for name in payload if name.startswith(SCALE_PREFIX)}
    if method == "int8":
        wanted = {SCALE_PREFIX + name for name in reference if reference[name].is_floating_point()}
        if scales != wanted:
            return "int8 scales do not match the model's float tensors"
        for name in sorted(scales):
            s = payload[name]
            if s.dtype != torch.float32 or s.dim() != 0 or not bool(torch.isfinite(s)) or float(s) < 0:
                return f"{name!r} is not a finite non-negative float32 scalar"
    elif scales:
        return f"unexpected scale tensors for {method}"
    like = {name: _payload_like(t, method) for name, t in reference.items()}
    return check_update({k: v for k, v in payload.items() if k not in scales}, like)


def _payload_like(ref: torch.Tensor, method: CompressionName) -> torch.Tensor:
    """An empty-valued tensor of the shape and dtype ``method`` sends for ``ref``."""
    if not ref.is_floating_point():
        return ref
    dtype = torch.int8 if method == "int8" else _HALF[method]
    return torch.zeros(tuple(ref.shape), dtype=dtype)
