"""safetensors files written byte-for-byte deterministically, read without pickle.

The ``safetensors`` library keeps a file's string metadata in a hash map, so two processes saving
the same tensors with the same (multi-key) metadata can write different bytes. fedavg needs the
opposite: every peer must produce the same file, hence the same sha256. :func:`dumps` writes the
format itself (8-byte little-endian header length, a compact JSON header with sorted metadata,
then the tensors' raw little-endian bytes) in a fixed order; :func:`loads` reads with the library.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping

import torch
from safetensors.torch import load as _load_bytes

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def dumps(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (moved to CPU) and ``metadata``; a pure function of its inputs.

    Tensors are laid out widest dtype first, then by name (as the library does, so every tensor
    starts aligned); the header is padded with spaces to a multiple of 8 bytes.
    """
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    items = []
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {tensor.dtype}")
        items.append((name, tensor.detach().to("cpu").contiguous()))
    items.sort(key=lambda item: (-item[1].element_size(), item[0]))

    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {key: str(metadata[key]) for key in sorted(metadata)}
    offset = 0
    for name, tensor in items:
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)
    start = 8 + len(head)
    out = bytearray(start + offset)  # each tensor's bytes copied once, into place
    out[:start] = struct.pack("<Q", len(head)) + head
    for name, tensor in items:
        begin, end = header[name]["data_offsets"]  # type: ignore[index]
        if end > begin:
            out[start + begin : start + end] = tensor.reshape(-1).view(torch.uint8).numpy().data
    return bytes(out)


def read_metadata(data: bytes) -> dict[str, str] | None:
    """The string map of a safetensors file's header (from its bytes, or at least its header's)."""
    if len(data) < 8:
        raise ValueError("not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("not a safetensors file (truncated header)")
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    meta = header.get("__metadata__")
    return dict(meta) if isinstance(meta, dict) else None


def loads(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, on CPU; never unpickles anything."""
    tensors: dict[str, torch.Tensor] = _load_bytes(data)
    return tensors
