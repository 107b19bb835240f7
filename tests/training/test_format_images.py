"""The images format's two halves as plain function calls: the upload check and the reader, on
images drawn here (scikit-learn's digits as 8x8 PNGs, coloured squares as JPEGs)."""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from swarmtrain.common import formats
from swarmtrain.common.events import DataSpec
from swarmtrain.training import data
from swarmtrain.training.formats import FORMATS, Limits, Rejected, UploadOptions
from tests.training.formatdata import archive, digit_images, digits, digits_zip, png

IMAGES = FORMATS.get("images")


def check(raw: bytes, image_size: tuple[int, int] | None = None, limits: Limits | None = None) -> object:
    return IMAGES.check(io.BytesIO(raw), UploadOptions(image_size=image_size), limits or Limits())


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_digits_as_a_folder_of_pngs(tmp_path: Path, kind: str) -> None:
    raw = digits_zip(limit=120, kind=kind)
    assert formats.detect(raw[:512], ["0/0000.png"] if kind == "zip" else None) == "images"
    summary = check(raw)
    assert (summary.rows, summary.classes, summary.shape, summary.features) == (120, 10, [1, 8, 8], 64)  # type: ignore[attr-defined]
    spec = summary.data  # type: ignore[attr-defined]
    assert spec == DataSpec(format="images", image_size=[8, 8], channels=1)
    assert formats.data_spec("images", summary.shape) == spec  # type: ignore[attr-defined]
    path = tmp_path / "d.archive"
    path.write_bytes(raw)
    ds = data.load(path, spec, "class")
    images, target = digits()
    order = sorted(range(120), key=lambda i: f"{target[i]}/{i:04d}.png")
    np.testing.assert_array_equal(ds.features.numpy(), (images[order] * 255 / 16).round().reshape(120, 64))
    assert ds.classes == [str(d) for d in range(10)]
    assert [int(ds.classes[c]) for c in ds.labels.tolist()] == [int(target[i]) for i in order]


def _squares(sizes: list[tuple[int, int]]) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    out = {}
    for i, (h, w) in enumerate(sizes * 6):
        colour = ("red", "blue")[i % 2]
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        out[f"root/{colour}/{i}.jpg"] = png(pixels, "JPEG")
    return out


def test_rgb_jpegs_of_mixed_sizes_need_an_image_size(tmp_path: Path) -> None:
    raw = archive(_squares([(10, 12), (16, 16)]))
    with pytest.raises(Rejected, match=r"2 sizes \(10x12, 16x16\): give image_size .* e.g. image_size=16x16"):
        check(raw)
    summary = check(raw, image_size=(6, 5))
    assert (summary.rows, summary.classes, summary.shape) == (12, 2, [3, 6, 5])  # type: ignore[attr-defined]
    assert summary.columns == ["blue", "red"]  # type: ignore[attr-defined]
    path = tmp_path / "s.archive"
    path.write_bytes(raw)
    ds = data.load(path, summary.data, "class")  # type: ignore[attr-defined]
    assert ds.features.shape == (12, 90)


def _tar_with_link() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        info = tarfile.TarInfo("a/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    return out.getvalue()


ONE = png(np.zeros((8, 8), dtype=np.uint8))


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (archive({**digit_images(20), "3/notes.png": b"not an image at all"}), "'3/notes.png' is not a PNG or JPEG"),
        (archive({**digit_images(20), "3/x.gif": png(np.zeros((8, 8), dtype=np.uint8), "GIF")}), "not a PNG or JPEG"),
        (archive({**digit_images(20), "../escape/a.png": ONE}), "unsafe member name"),
        (archive({**digit_images(20), "/abs/a.png": ONE}, "tar"), "unsafe member name"),
        (_tar_with_link(), "a link or a device"),
        (archive({f"only/{i}.png": ONE for i in range(12)}), "fewer than 2 classes"),
        (archive({"flat.png": ONE}), "is not <class>/<file>"),
        (archive({"a/b/c/d.png": ONE}), "is not <class>/<file>"),
        (archive({"a/1.png": png(np.zeros((3000, 3000), dtype=np.uint8)), "b/1.png": ONE}), "at most 1,000,000 pixels"),
        (archive({f"{i % 2}/{i}.png": np.zeros(1 << 20, dtype=np.uint8).tobytes() for i in range(4)}), "uncompressed"),
        (b"\x1f\x8b not a gzip", "not a zip or tar archive"),
        (digits_zip(40)[:-300], "zip"),
    ],
    ids=[
        "not-an-image",
        "gif",
        "dotdot",
        "absolute",
        "symlink",
        "one-class",
        "flat",
        "deep",
        "pixels",
        "bomb",
        "bad-gzip",
        "cut-zip",
    ],
)
def test_refuses_with_a_reason(raw: bytes, needle: str) -> None:
    with pytest.raises(Rejected) as caught:
        check(raw, limits=Limits(max_uncompressed_bytes=2 << 20, max_image_pixels=1_000_000))
    assert needle in str(caught.value)


def test_a_member_that_lies_about_its_size_is_read_no_further_than_it_declares() -> None:
    """The declared sizes are capped; zipfile reads no more than a member declares (its CRC then
    fails), so what is actually inflated is capped too."""
    raw = bytearray(archive({**digit_images(20), "1/big.png": ONE + b"\0" * (8 << 20)}))
    at = raw.rfind(b"PK\x01\x02")  # the last central directory entry: 1/big.png
    raw[at + 24 : at + 28] = struct.pack("<I", 1000)
    local = raw.find(b"1/big.png") - 30
    raw[local + 22 : local + 26] = struct.pack("<I", 1000)
    with pytest.raises(Rejected, match=r"'1/big\.png' cannot be read: Bad CRC-32"):
        check(bytes(raw), limits=Limits(max_uncompressed_bytes=1 << 20))
