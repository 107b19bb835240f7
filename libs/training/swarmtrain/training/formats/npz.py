"""The NumPy format: an ``.npz`` (a zip of ``.npy`` members) holding ``x`` and ``y``.

``x`` is rows x features, or images: rows x C x H x W (channels first when the second axis has at
most 4 entries), rows x H x W x C (channels last, when the last one has), or rows x H x W (one
channel). ``y`` holds one label per row: integers or strings (floats only when each is a whole
number). Arrays are numeric only and never unpickled: the check reads the ``.npy`` headers and
refuses an object dtype before reading any data, and the reader loads with ``allow_pickle=False``,
always. Members' declared sizes are capped, and zipfile reads no more than a member declares.
"""

from __future__ import annotations

import math
import zipfile
from collections import Counter
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from swarmtrain.common.events import DataSpec
from swarmtrain.training.formats.base import (
    FORMATS,
    PREVIEW_ROWS,
    Blocks,
    DataError,
    Index,
    Limits,
    Preview,
    Rejected,
    Summary,
    Table,
    Target,
    UploadOptions,
    block_rows,
    cells,
    check_classes,
    check_declared_size,
    check_member_name,
    check_regression,
    encode_labels,
    regression_table,
    scan_table,
    shown_columns,
    shown_counts,
)

_CHUNK = 1 << 20
MAX_CHANNELS = 4
"""An image axis with at most this many entries is its channels."""


def row_shape(shape: tuple[int, ...]) -> tuple[list[int], bool]:
    """One row's feature shape for an ``x`` of ``shape`` (``[features]`` or ``[C, H, W]``), and
    whether its images are channels last (transposed to channels first when read)."""
    if len(shape) == 2:
        return [shape[1]], False
    if len(shape) == 3:
        return [1, shape[1], shape[2]], False
    if len(shape) == 4:
        if shape[1] <= MAX_CHANNELS:
            return [shape[1], shape[2], shape[3]], False
        if shape[3] <= MAX_CHANNELS:
            return [shape[3], shape[1], shape[2]], True
        raise Rejected(
            f"x has shape {list(shape)}: images are rows x C x H x W or rows x H x W x C with at most "
            f"{MAX_CHANNELS} channels"
        )
    raise Rejected(
        f"x has {len(shape)} axes: it is rows x features, rows x H x W, or rows x C x H x W / rows x H x W x C"
    )


def _header(member: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype[np.generic]]:
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"format version {version}")
    except ValueError as exc:
        raise Rejected(f"array {name} is not a valid .npy array: {exc}") from None
    if dtype.hasobject:
        raise Rejected(
            f"array {name} holds Python objects (dtype object): only numeric arrays are read, never unpickled"
        )
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _read_exact(member: IO[bytes], n: int, name: str) -> bytes:
    data = member.read(n)
    if len(data) != n:
        raise Rejected(f"array {name} is truncated: its header promises more data than it holds")
    return data


def check_npz(stream: BinaryIO, label_column: str, limits: Limits) -> Summary:
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError) as exc:
        raise Rejected(f"not an .npz file: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            raise Rejected(f"the archive has {len(infos):,} members: at most {limits.max_members:,}")
        for info in infos:
            check_member_name(info.filename)
        check_declared_size(sum(info.file_size for info in infos), limits)
        names = {info.filename for info in infos}
        missing = [a for a in ("x", "y") if f"{a}.npy" not in names]
        if missing:
            shown = ", ".join(sorted(n.removesuffix(".npy") for n in names)[:20]) or "none"
            raise Rejected(f"an .npz needs arrays x and y; missing {' and '.join(missing)} (it has {shown})")
        try:
            with archive.open("x.npy") as member:
                shape, _, dtype = _header(member, "x")
                if dtype.kind not in "biuf":
                    raise Rejected(f"array x has dtype {dtype}: features are numbers (bool, integers or floats)")
                per_row, _ = row_shape(shape)
                rows = shape[0]
                count = math.prod(shape)
                left = count * dtype.itemsize
                step = max(dtype.itemsize, _CHUNK - _CHUNK % dtype.itemsize)
                while left:
                    chunk = np.frombuffer(_read_exact(member, min(step, left), "x"), dtype=dtype)
                    left -= chunk.nbytes
                    if dtype.kind == "f" and not np.isfinite(chunk).all():
                        raise Rejected("array x has a value that is not a finite number (NaN or infinity)")
            with archive.open("y.npy") as member:
                y_shape, _, y_dtype = _header(member, "y")
                if len(y_shape) != 1 or y_shape[0] != rows:
                    raise Rejected(f"array y has shape {list(y_shape)}: it must be one label per row of x ({rows})")
                if y_dtype.kind not in "biufU":
                    raise Rejected(f"array y has dtype {y_dtype}: labels are integers or strings")
                y = np.frombuffer(_read_exact(member, rows * y_dtype.itemsize, "y"), dtype=y_dtype)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:  # a CRC error, a broken stream
            raise Rejected(f"not a valid .npz file: {exc}") from None
    if y_dtype.kind == "f" and np.isfinite(y).all() and (y != np.round(y)).any():
        target = Target()
        target.see_numbers(y)
        return Summary(
            rows=rows,
            features=math.prod(per_row),
            classes=0,
            columns=["x", "y"],
            label_column="y",
            shape=per_row,
            data=DataSpec(format="npz", task="regression"),
            target="regression",
            target_range=check_regression(target, rows, "y"),
        )
    labels = _labels(y)
    counts = Counter(labels.tolist())
    check_classes(counts, rows, label_column)
    return Summary(
        rows=rows,
        features=math.prod(per_row),
        classes=len(counts),
        columns=["x", "y"],
        label_column="y",
        shape=per_row,
        class_counts=shown_counts(counts),
        data=DataSpec(format="npz"),
    )


def _labels(y: np.ndarray) -> np.ndarray:
    """``y`` as label strings; floats must be whole numbers (class numbers)."""
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not (y == np.round(y)).all():
            raise Rejected("array y holds fractional numbers: labels are classes (integers or strings)")
        y = y.astype(np.int64)
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    return y.astype(str)


def _table_facts(x_shape: tuple[int, ...], y: np.ndarray) -> tuple[list[int], bool, list[str], np.ndarray]:
    """``(per-row shape, channels last, classes, labels)`` of an ``x`` of ``x_shape`` and its ``y``."""
    try:
        per_row, channels_last = row_shape(x_shape)
    except Rejected as exc:
        raise DataError(str(exc)) from None
    if len(y) != x_shape[0]:
        raise DataError(f"x has {x_shape[0]} rows but y has {len(y)} labels")
    try:
        classes, labels = encode_labels(_labels(y))
    except Rejected as exc:
        raise DataError(str(exc)) from None
    return per_row, channels_last, classes, labels


def _flat(x: np.ndarray, channels_last: bool) -> np.ndarray:
    """Rows of ``x`` as float32 features, channels first."""
    if channels_last:
        x = np.moveaxis(x, 3, 1)
    return np.ascontiguousarray(x.reshape(x.shape[0], -1), dtype=np.float32)


def load_npz(path: Path, regression: bool = False) -> Table:
    try:
        with np.load(path, allow_pickle=False) as npz:
            x = npz["x"]
            y = npz["y"]
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"the .npz cannot be read: {exc}") from None
    if regression:
        try:
            per_row, channels_last = row_shape(tuple(x.shape))
        except Rejected as exc:
            raise DataError(str(exc)) from None
        if len(y) != x.shape[0]:
            raise DataError(f"x has {x.shape[0]} rows but y has {len(y)} labels")
        return regression_table(_flat(x, channels_last), y, [f"x{i}" for i in range(math.prod(per_row))], "y")
    per_row, channels_last, classes, labels = _table_facts(tuple(x.shape), y)
    return Table(
        features=_flat(x, channels_last),
        labels=labels,
        classes=classes,
        feature_names=[f"x{i}" for i in range(math.prod(per_row))],
        label_column="y",
    )


def _x_header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[np.generic]]:
    try:
        return _header(member, "x")
    except Rejected as exc:
        raise DataError(str(exc)) from None


def index_npz(path: Path) -> Index:
    """``y`` and ``x``'s header: none of ``x``'s data is read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            y = npz["y"]
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            shape, _, _ = _x_header(member)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"the .npz cannot be read: {exc}") from None
    per_row, _, classes, labels = _table_facts(shape, y)
    return Index(
        labels=labels, classes=classes, feature_names=[f"x{i}" for i in range(math.prod(per_row))], label_column="y"
    )


def scan_npz(path: Path, rows: np.ndarray) -> Blocks:
    """``rows``' features, reading ``x.npy`` (stored or deflated) front to back in blocks of about
    ``BLOCK_BYTES``, skipping blocks without one of them: ``x`` is never whole in memory (a
    Fortran-ordered ``x``, whose rows are not contiguous, is the exception: read whole)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            shape, fortran, dtype = _x_header(member)
            _, channels_last = row_shape(shape)
            if fortran:
                yield from scan_table(load_npz(path), rows)
                return
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            data_at = member.tell()
            step = block_rows(row_bytes)
            for start in range(0, shape[0], step):
                stop = min(shape[0], start + step)
                lo, hi = np.searchsorted(rows, [start, stop])
                if lo == hi:
                    continue
                member.seek(data_at + start * row_bytes)
                raw = _read_exact(member, (stop - start) * row_bytes, "x")
                block = np.frombuffer(raw, dtype=dtype).reshape(stop - start, *shape[1:])
                wanted = rows[lo:hi]
                yield wanted, _flat(block[wanted - start], channels_last)
    except Rejected as exc:
        raise DataError(str(exc)) from None
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"the .npz cannot be read: {exc}") from None


class NpzFormat:
    """``npz``: arrays ``x`` and ``y``, numeric, never unpickled."""

    def check(self, stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
        return check_npz(stream, options.label_column, limits)

    def load(self, path: Path, spec: DataSpec, label_column: str) -> Table:
        return load_npz(path, regression=spec.task == "regression")

    def index(self, path: Path, spec: DataSpec, label_column: str) -> Index:
        return index_npz(path)

    def scan(self, path: Path, spec: DataSpec, label_column: str, rows: np.ndarray) -> Blocks:
        return scan_npz(path, rows)

    def preview(self, path: Path, spec: DataSpec, label_column: str) -> Preview:
        table = load_npz(path, regression=spec.task == "regression")

        def label(i: int) -> object:
            return table.labels[i].item() if table.target == "regression" else table.classes[int(table.labels[i])]

        names = ["y", *table.feature_names]
        rows = [cells([label(i), *table.features[i].tolist()]) for i in range(min(PREVIEW_ROWS, len(table.labels)))]
        return Preview(columns=shown_columns(names), rows=rows)


FORMATS.add("npz", NpzFormat())
