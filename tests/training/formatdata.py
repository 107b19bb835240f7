"""Datasets of every format made in memory for the format tests (no download): seeded numpy tables
and scikit-learn's digits (8x8 images, ten classes) in each format's bytes."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_digits


def table(rows: int = 60, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A separable table: ``rows`` x 4 float features and string labels ``c0 .. c{classes-1}``."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % classes
    x = rng.normal(size=(rows, 4)).astype(np.float32) + y[:, None] * 3.0
    return x, np.asarray([f"c{i}" for i in y])


def parquet_bytes(columns: dict[str, object], row_group_size: int | None = None) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out, row_group_size=row_group_size)
    return out.getvalue()


def table_parquet(rows: int = 60, classes: int = 3, row_group_size: int | None = None) -> bytes:
    x, y = table(rows, classes)
    columns: dict[str, object] = {f"f{i}": x[:, i] for i in range(x.shape[1])}
    columns["colour"] = pa.array([("red", "green")[i % 2] for i in range(rows)]).dictionary_encode()
    columns["label"] = y
    return parquet_bytes(columns, row_group_size)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: 1797 images 8x8 (values 0..16) and their digit."""
    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def digits_npz(channels_last: bool = False) -> bytes:
    images, target = digits()
    x = images[:, :, :, None] if channels_last else images[:, None, :, :]
    return npz_bytes(x=x, y=target)


def png(array: np.ndarray, kind: str = "PNG") -> bytes:
    """``array`` (H x W grayscale, or H x W x 3) as image bytes."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=kind)
    return out.getvalue()


def archive(members: dict[str, bytes], kind: str = "zip") -> bytes:
    """A zip, or a tar (``tar``, ``tar.gz``), of ``members``."""
    out = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in members.items():
                z.writestr(name, data)
    else:
        with tarfile.open(fileobj=out, mode="w:gz" if kind == "tar.gz" else "w") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def digit_images(limit: int = 200, root: str = "") -> dict[str, bytes]:
    """The first ``limit`` of scikit-learn's digits as 8x8 grayscale PNGs, ``<root><digit>/<n>.png``."""
    images, target = digits()
    pixels = (images * 255 / 16).round().astype(np.uint8)
    return {f"{root}{target[i]}/{i:04d}.png": png(pixels[i]) for i in range(min(limit, len(target)))}


def digits_zip(limit: int = 200, kind: str = "zip") -> bytes:
    return archive(digit_images(limit), kind)


def corpus(lines: int = 200, seed: int = 0) -> list[str]:
    """Sentences from a seeded generator over a small vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "café", "über", "naïve"]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(lines)]


def jsonl(lines: list[str]) -> bytes:
    return "".join(json.dumps({"text": line, "id": i}) + "\n" for i, line in enumerate(lines)).encode()


def diabetes() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's diabetes: 442 rows of 10 numeric features and a disease-progression target."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    return data.data.astype(np.float64), data.target.astype(np.float64), list(data.feature_names)


def diabetes_parquet() -> bytes:
    """The diabetes table as Parquet, its float target in ``progression`` (a regression target)."""
    x, y, names = diabetes()
    columns: dict[str, object] = {name: x[:, i] for i, name in enumerate(names)}
    columns["progression"] = y
    return parquet_bytes(columns)


def diabetes_parts(cut: int = 352) -> tuple[bytes, bytes]:
    """The diabetes table cut in two Parquet files: rows before ``cut`` (to train) and after (to validate)."""
    x, y, names = diabetes()

    def part(rows: slice) -> bytes:
        columns: dict[str, object] = {name: x[rows, i] for i, name in enumerate(names)}
        columns["progression"] = y[rows]
        return parquet_bytes(columns)

    return part(slice(0, cut)), part(slice(cut, None))
