"""What a data format is: one module with its upload check and its reader side by side, behind
:class:`Format`, registered in :data:`FORMATS` (``common.registry``).

Both halves are numpy and the standard library only (no torch): the gateway runs the check, and a
peer, the scheduler and the CLI run the reader (``training.data.load`` turns its :class:`Table`
into tensors). A check reads its stream once with bounded memory and either returns a
:class:`Summary` or raises :class:`Rejected` with a reason a person can act on; the reader parses
the file the check accepted, the same way on every machine.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from swarmtrain.common.events import MAX_NAME, MAX_SHOWN_CLASSES, DataSpec
from swarmtrain.common.registry import Registry

MIN_ROWS = 10
MIN_CLASSES = 2
MAX_CLASSES = 10_000


class Rejected(ValueError):
    """The upload is not a usable dataset of its format; ``str(exc)`` says why."""


class DataError(ValueError):
    """The data cannot be trained on; the message says why, in words fit for a person."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What an upload may hold beyond its size (the gateway's settings)."""

    max_uncompressed_bytes: int = 4 << 30
    """An archive's members together, uncompressed: declared and actually read."""
    max_members: int = 1_000_000
    """Members of an archive."""
    max_image_pixels: int = 1 << 24
    """Pixels of one image (its header is read before its pixels: a decompression bomb is refused)."""


@dataclass(frozen=True, kw_only=True)
class UploadOptions:
    label_column: str = "label"
    image_size: tuple[int, int] | None = None
    """images: ``(H, W)`` to resize every image to; None: their one common size."""
    vocab_size: int | None = None
    """text: train a BPE tokenizer of this vocabulary on the corpus; None: the byte tokenizer."""


@dataclass(frozen=True, kw_only=True)
class Summary:
    """What a check found: the facts ``DatasetUploaded`` records."""

    rows: int
    features: int
    classes: int
    columns: list[str]
    label_column: str
    """The column (or array) the labels are in."""
    shape: list[int]
    """One row's feature shape: ``[features]``, or ``[C, H, W]``."""
    class_counts: dict[str, int] = field(default_factory=dict)
    """Rows per class, when there are at most ``MAX_SHOWN_CLASSES`` and every name fits; else empty."""
    data: DataSpec = field(default_factory=DataSpec)
    """How peers read it (the format, and what the upload fixed)."""
    tokens: int = 0
    """text: the corpus's length in tokens."""
    tokenizer_json: str | None = None
    """text, bpe: the trained tokenizer, which the gateway stores beside the dataset."""
    target: str = "classification"
    """What the label is (``events.Task``): classes, a regression target, none for a corpus."""
    target_range: list[float] = field(default_factory=list)
    """regression: ``[min, max]`` of the target."""


@dataclass(frozen=True, kw_only=True)
class Table:
    """A parsed dataset: numpy, as every format's reader returns it."""

    features: np.ndarray
    """float32, shape (rows, features)."""
    labels: np.ndarray
    """int64, shape (rows,): indexes into ``classes``; a regression's targets: float32."""
    classes: list[str]
    """Sorted unique label strings; a label's index is its class number (none for a regression)."""
    feature_names: list[str]
    label_column: str
    target: str = "classification"
    vocab: int = 0
    """A corpus's vocabulary: its features are token ids, its labels the next tokens (rows, context)."""


@dataclass(frozen=True, kw_only=True)
class Index:
    """A parsed dataset without its features: what sharding and a model's shape need, read without
    decoding the features (a column, an array's header and labels, the member names)."""

    labels: np.ndarray
    """int64, shape (rows,): every row's class index, as ``Table.labels``."""
    classes: list[str]
    feature_names: list[str]
    label_column: str

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])


Blocks = Iterator[tuple[np.ndarray, np.ndarray]]
"""A scan's blocks: ``(row indexes, float32 features of those rows)``, ascending."""

BLOCK_BYTES = 8 << 20
"""About how many bytes of features a scan decodes at a time."""


def block_rows(row_bytes: int) -> int:
    """Rows a block of a scan holds, for rows of ``row_bytes`` bytes."""
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def scan_table(table: Table, rows: np.ndarray) -> Blocks:
    """A scan of a table already parsed whole (a format without random access)."""
    step = block_rows(table.features.shape[1] * 4)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        yield part, table.features[part]


PREVIEW_ROWS = 10
PREVIEW_COLUMNS = 20
PREVIEW_CLASSES = 20
PREVIEW_THUMBNAILS = 4


@dataclass(frozen=True, kw_only=True)
class Preview:
    """What a person looks at before training: the first rows of a table (at most
    ``PREVIEW_COLUMNS`` columns), thumbnails per class for images (PNG, base64), the first lines of
    a corpus. Read from the stored file; the class counts and token count are the dataset's."""

    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    thumbnails: dict[str, list[str]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


class Format(Protocol):
    """One data format's halves: the upload check, the reader, and the preview."""

    def check(self, stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
        """Validate an upload read from ``stream`` (seekable, from its start); raises ``Rejected``."""
        ...

    def load(self, path: Path, spec: DataSpec, label_column: str) -> Table:
        """Parse the file ``path`` (which its check accepted); raises ``DataError``."""
        ...

    def preview(self, path: Path, spec: DataSpec, label_column: str) -> Preview:
        """The first rows (or images, or lines) of the file ``path``, read no further than needed."""
        ...

    def index(self, path: Path, spec: DataSpec, label_column: str) -> Index:
        """``load``'s labels, classes and feature names, without reading the features."""
        ...

    def scan(self, path: Path, spec: DataSpec, label_column: str, rows: np.ndarray) -> Blocks:
        """The features of ``rows`` (sorted, unique row indexes) in blocks, ascending: exactly
        ``load``'s rows, with memory bounded by a block (plus what the format must hold)."""
        ...


def cells(values: list[object]) -> list[str]:
    """A preview row's cells as text, at most ``PREVIEW_COLUMNS`` of them (shortened)."""
    shown = [str(v)[:40] for v in values[:PREVIEW_COLUMNS]]
    return [*shown, "..."] if len(values) > PREVIEW_COLUMNS else shown


def shown_columns(names: list[str]) -> list[str]:
    return cells(list(names))


FORMATS: Registry[Format] = Registry("data format")
"""Every format's two halves by its contract name (``common.formats`` holds its facts)."""


class RawStream(io.RawIOBase):
    """Adapts any binary stream to RawIOBase (for TextIOWrapper) without closing it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def shown_counts(counts: Counter[str]) -> dict[str, int]:
    """``counts`` as ``DatasetUploaded.class_counts`` holds them: sorted by name; empty when too many
    classes, or a name too long, to show."""
    if len(counts) > MAX_SHOWN_CLASSES or any(len(name) > MAX_NAME or "\x00" in name for name in counts):
        return {}
    return {name: counts[name] for name in sorted(counts)}


def check_classes(counts: Counter[str], rows: int, label_column: str) -> None:
    """The label rules every table format shares: enough rows, at least two classes, not too many."""
    if rows < MIN_ROWS:
        raise Rejected(f"too few rows: {rows} data rows, at least {MIN_ROWS} are needed")
    if len(counts) > MAX_CLASSES:
        raise Rejected(f"more than {MAX_CLASSES} classes in {label_column!r}: is it really a class label?")
    if len(counts) < MIN_CLASSES:
        raise Rejected(
            f"fewer than {MIN_CLASSES} classes: the label column {label_column!r} has {len(counts)} distinct value"
        )


class Target:
    """What one pass over a label column learns about it besides its classes: whether every value
    is a number, whether one has a fraction (then it is a regression target), its range."""

    def __init__(self) -> None:
        self.numeric = True
        self.fractional = False
        self.low = math.inf
        self.high = -math.inf

    def see(self, label: str) -> None:
        if not self.numeric:
            return
        try:
            value = float(label)
        except ValueError:
            self.numeric = False
            return
        if not math.isfinite(value):
            self.numeric = False
            return
        self.fractional = self.fractional or value != round(value)
        self.low, self.high = min(self.low, value), max(self.high, value)

    def see_numbers(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if not values.size:
            return
        self.fractional = self.fractional or bool((values != np.round(values)).any())
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))

    @property
    def regression(self) -> bool:
        """A numeric label with a fractional value: a number to predict, not a class."""
        return self.numeric and self.fractional


def check_regression(target: Target, rows: int, label_column: str) -> list[float]:
    """The rules of a regression target: enough rows, not one constant; its ``[min, max]``."""
    if rows < MIN_ROWS:
        raise Rejected(f"too few rows: {rows} data rows, at least {MIN_ROWS} are needed")
    if not target.high > target.low:
        raise Rejected(f"the regression target {label_column!r} is constant ({target.low:g}): nothing to learn")
    return [target.low, target.high]


def regression_targets(values: np.ndarray, label_column: str) -> np.ndarray:
    """A regression's targets as float32 (rows,); a DataError for a value that is not a finite number."""
    try:
        y = np.asarray(values, dtype=np.float64).reshape(-1)
    except ValueError:
        raise DataError(f"the regression target {label_column!r} has a value that is not a number") from None
    if not np.isfinite(y).all():
        raise DataError(f"the regression target {label_column!r} has a value that is not a finite number")
    return y.astype(np.float32)


def regression_table(features: np.ndarray, labels: np.ndarray, names: list[str], label_column: str) -> Table:
    """A parsed table whose labels are a regression target."""
    return Table(
        features=np.ascontiguousarray(features, dtype=np.float32),
        labels=regression_targets(labels, label_column),
        classes=[],
        feature_names=names,
        label_column=label_column,
        target="regression",
    )


def encode_labels(labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Label strings as ``(sorted classes, int64 class index per row)``."""
    classes, y = np.unique(labels.astype(str), return_inverse=True)
    return [str(c) for c in classes], y.astype(np.int64).reshape(-1)


def check_member_name(name: str) -> None:
    """An archive member's name must stay inside the archive: no absolute path, no ``..``."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (parts and len(parts[0]) == 2 and parts[0][1] == ":") or ".." in parts:
        raise Rejected(f"unsafe member name in the archive: {name[:200]!r} (an absolute path or '..')")


def check_declared_size(total: int, limits: Limits) -> None:
    if total > limits.max_uncompressed_bytes:
        raise Rejected(
            f"the archive's members hold {total:,} bytes uncompressed: at most {limits.max_uncompressed_bytes:,}"
            " (SWARMTRAIN_MAX_UNCOMPRESSED_MB)"
        )
