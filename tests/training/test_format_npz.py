"""The npz format's two halves as plain function calls: the upload check and the reader."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from swarmtrain.common import formats
from swarmtrain.common.events import DataSpec
from swarmtrain.training import data
from swarmtrain.training.formats import FORMATS, Limits, Rejected, UploadOptions
from tests.training.formatdata import digits, digits_npz, npz_bytes, table

NPZ = FORMATS.get("npz")


def check(raw: bytes, limits: Limits | None = None) -> object:
    return NPZ.check(io.BytesIO(raw), UploadOptions(), limits or Limits())


def test_a_table_of_arrays() -> None:
    x, y = table(rows=30, classes=3)
    summary = check(npz_bytes(x=x, y=y))
    assert (summary.rows, summary.features, summary.classes, summary.shape) == (30, 4, 3, [4])  # type: ignore[attr-defined]
    assert summary.class_counts == {"c0": 10, "c1": 10, "c2": 10}  # type: ignore[attr-defined]
    assert summary.data == DataSpec(format="npz")  # type: ignore[attr-defined]


@pytest.mark.parametrize("channels_last", [False, True])
def test_digits_as_images_either_channel_order_read_the_same(tmp_path: Path, channels_last: bool) -> None:
    raw = digits_npz(channels_last=channels_last)
    summary = check(raw)
    assert (summary.rows, summary.shape, summary.classes) == (1797, [1, 8, 8], 10)  # type: ignore[attr-defined]
    path = tmp_path / "d.npz"
    path.write_bytes(raw)
    ds = data.load(path, DataSpec(format="npz"), "y")
    images, target = digits()
    assert ds.features.shape == (1797, 64)
    np.testing.assert_array_equal(ds.features.numpy(), images.reshape(1797, 64))
    assert ds.classes == [str(i) for i in range(10)]
    np.testing.assert_array_equal(ds.labels.numpy(), target)


def test_detected_from_its_content() -> None:
    raw = digits_npz()
    members = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    assert formats.detect(raw[:512], members) == "npz"
    assert formats.detect(b"a,b,label\n1,2,x\n", None) == "csv"


def _object_npz() -> bytes:
    """An npz whose x is an object array (pickled): what allow_pickle=False must never load."""
    out = io.BytesIO()
    np.savez(out, x=np.array([{"a": 1}] * 10, dtype=object), y=np.arange(10) % 2)
    return out.getvalue()


def _bomb() -> bytes:
    """A member that declares 64 MiB and compresses to a few KiB."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        buf = io.BytesIO()
        np.save(buf, np.zeros((1 << 23, 1), dtype=np.float64))
        z.writestr("x.npy", buf.getvalue())
        buf = io.BytesIO()
        np.save(buf, np.zeros(1 << 23, dtype=np.int64))
        z.writestr("y.npy", buf.getvalue())
    return out.getvalue()


def _traversal() -> bytes:
    out = io.BytesIO()
    x, y = table(rows=20)
    with zipfile.ZipFile(out, "w") as z:
        for name, array in (("x.npy", x), ("y.npy", y), ("../evil.npy", y)):
            buf = io.BytesIO()
            np.save(buf, array)
            z.writestr(name, buf.getvalue())
    return out.getvalue()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_object_npz(), "holds Python objects"),
        (_bomb(), "uncompressed"),
        (_traversal(), "unsafe member name"),
        (npz_bytes(x=np.zeros((20, 2))), "missing y"),
        (npz_bytes(x=np.zeros((20, 2)), y=np.zeros(19)), "one label per row"),
        (npz_bytes(x=np.zeros((20, 2)), y=np.zeros(20)), "fewer than 2 classes"),
        (npz_bytes(x=np.full((20, 2), np.nan), y=np.arange(20) % 2), "not a finite number"),
        (npz_bytes(x=np.zeros((20, 2)), y=np.full(20, 0.5)), "regression target 'y' is constant"),
        (npz_bytes(x=np.zeros((20, 9, 9, 9)), y=np.arange(20) % 2), "at most 4 channels"),
        (b"PK\x03\x04 not really a zip", "not an .npz file"),
    ],
)
def test_refuses_with_a_reason(raw: bytes, needle: str) -> None:
    with pytest.raises(Rejected) as caught:
        check(raw, Limits(max_uncompressed_bytes=32 << 20))
    assert needle in str(caught.value)


def test_the_reader_never_unpickles(tmp_path: Path) -> None:
    path = tmp_path / "o.npz"
    path.write_bytes(_object_npz())
    with pytest.raises(data.DataError, match="cannot be read"):
        data.load(path, DataSpec(format="npz"), "y")
