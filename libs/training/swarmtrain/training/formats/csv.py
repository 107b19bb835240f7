"""The CSV format: a header row, one label column (any values, at least two distinct ones), every
other column a numeric feature. Both halves of it: :func:`check_csv`, the gateway's one pass over
an upload, line by line with bounded memory, and :func:`load_csv`, the reader every process parses
a dataset with.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from swarmtrain.common.events import CSV, DataSpec
from swarmtrain.training.formats.base import (
    FORMATS,
    MAX_CLASSES,
    PREVIEW_ROWS,
    Blocks,
    DataError,
    Index,
    Limits,
    Preview,
    RawStream,
    Rejected,
    Summary,
    Table,
    Target,
    UploadOptions,
    cells,
    check_classes,
    check_regression,
    encode_labels,
    regression_table,
    scan_table,
    shown_columns,
    shown_counts,
)

MAX_LINE_CHARS = 1 << 20
_READ_CHUNK = 1 << 16

CsvRejected = Rejected
"""The upload is not a usable training CSV (the name the gateway's check had)."""


def _lines(text: io.TextIOWrapper) -> Iterator[str]:
    number = 0
    while line := text.readline(MAX_LINE_CHARS):
        number += 1
        if "\x00" in line:
            raise Rejected(f"not a CSV file: line {number} contains NUL bytes (a binary file?)")
        if len(line) >= MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            raise Rejected(f"not a CSV file: line {number} is longer than {MAX_LINE_CHARS} characters")
        yield line


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def check_csv(stream: BinaryIO, label_column: str = "label") -> Summary:
    """Validate a CSV read from ``stream`` (from its current position); raises ``Rejected``."""
    text = io.TextIOWrapper(io.BufferedReader(RawStream(stream), _READ_CHUNK), encoding="utf-8-sig", newline="")
    reader = csv.reader(_lines(text), strict=True)
    try:
        with text:
            return _check_rows(reader, label_column)
    except UnicodeDecodeError:
        raise Rejected("not a CSV file: it is not UTF-8 text (a binary file?)") from None
    except csv.Error as exc:
        raise Rejected(f"not a CSV file: {exc} (line {reader.line_num})") from None


def _header(reader: Iterator[list[str]], label_column: str) -> tuple[list[str], int]:
    header = next((row for row in reader if row), None)
    if header is None:
        raise Rejected("not a CSV file: it is empty")
    columns = [name.strip() for name in header]
    seen: set[str] = set()
    for position, name in enumerate(columns, start=1):
        if not name:
            raise Rejected(f"not a CSV file: header column {position} has no name")
        if name in seen:
            raise Rejected(f"not a CSV file: the header names column {name!r} twice")
        seen.add(name)
    if label_column not in seen:
        shown = ", ".join(repr(c) for c in columns[:20]) + (", ..." if len(columns) > 20 else "")
        raise Rejected(f"no label column {label_column!r}: the header has {shown}")
    if len(columns) < 2:
        raise Rejected(f"no feature columns: the header has only the label column {label_column!r}")
    return columns, columns.index(label_column)


def _check_rows(reader: Iterator[list[str]], label_column: str) -> Summary:
    columns, label_at = _header(reader, label_column)
    features = [(i, name) for i, name in enumerate(columns) if i != label_at]
    width = len(columns)
    labels: Counter[str] = Counter()
    target = Target()
    rows = 0
    for row in reader:
        if not row or row == [""]:
            continue  # a blank line
        rows += 1
        if len(row) != width:
            raise Rejected(f"not a CSV file: row {rows} has {len(row)} fields but the header has {width}")
        for i, name in features:
            if not _is_number(row[i]):
                raise Rejected(
                    f"non-numeric feature: column {name!r}, row {rows}: {row[i].strip()[:40]!r} is not a number"
                )
        label = row[label_at].strip()
        if not label:
            raise Rejected(f"empty label: column {label_column!r}, row {rows}")
        target.see(label)
        if len(labels) <= MAX_CLASSES:
            labels[label] += 1
        elif not target.numeric:
            raise Rejected(f"more than {MAX_CLASSES} classes in {label_column!r}: is it really a class label?")
    if target.regression:
        return Summary(
            rows=rows,
            features=len(features),
            classes=0,
            columns=columns,
            label_column=label_column,
            shape=[len(features)],
            target="regression",
            target_range=check_regression(target, rows, label_column),
            data=DataSpec(task="regression"),
        )
    if len(labels) > MAX_CLASSES:
        raise Rejected(f"more than {MAX_CLASSES} classes in {label_column!r}: is it really a class label?")
    check_classes(labels, rows, label_column)
    return Summary(
        rows=rows,
        features=len(features),
        classes=len(labels),
        columns=columns,
        label_column=label_column,
        shape=[len(features)],
        class_counts=shown_counts(labels),
    )


def load_csv(path: Path, label_column: str = "label") -> Table:
    """Read ``path`` into tensors. Blank lines are skipped; anything else malformed is a DataError.

    A plain numeric file takes numpy's C parser; anything it refuses (quotes, a ragged row, a bad
    cell) is read again by the careful path below, which says exactly what is wrong.
    """
    fast = _load_plain(path, label_column)
    if fast is not None:
        return fast
    feature_names, labels, x = _read_careful(path, label_column)
    classes = sorted(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    y = np.asarray([index[label] for label in labels], dtype=np.int64)
    return Table(
        features=x,
        labels=y,
        classes=classes,
        feature_names=feature_names,
        label_column=label_column,
    )


def _load_plain(path: Path, label_column: str) -> Table | None:
    with path.open(encoding="utf-8-sig") as f:
        header = [name.strip() for name in f.readline().rstrip("\r\n").split(",")]
    if label_column not in header or len(header) < 2 or any('"' in name for name in header):
        return None
    label_at = header.index(label_column)
    keep = [i for i in range(len(header)) if i != label_at]
    read = {"delimiter": ",", "skiprows": 1, "encoding": "utf-8-sig", "comments": None}
    try:
        with warnings.catch_warnings():  # numpy notes blank lines and empty files: both are handled here
            warnings.simplefilter("ignore", UserWarning)
            # every column must parse, and no row may be ragged: numpy checks each line's width
            x = np.loadtxt(path, usecols=keep, dtype=np.float32, ndmin=2, **read)  # type: ignore[call-overload]
            labels = np.loadtxt(path, usecols=[label_at], dtype=str, ndmin=1, **read)  # type: ignore[call-overload]
    except ValueError:
        return None
    if x.shape[0] == 0 or x.shape[0] != labels.shape[0] or not np.isfinite(x).all():
        return None
    classes, y = encode_labels(np.char.strip(labels))
    return Table(
        features=np.ascontiguousarray(x),
        labels=y,
        classes=classes,
        feature_names=[header[i] for i in keep],
        label_column=label_column,
    )


def load_csv_regression(path: Path, label_column: str) -> Table:
    """Read ``path`` whose label column is a regression target (numbers, float32)."""
    names, labels, x = _read_careful(path, label_column)
    return regression_table(x, np.asarray(labels), names, label_column)


def _read_careful(path: Path, label_column: str) -> tuple[list[str], list[str], np.ndarray]:
    """``(feature names, label strings, float32 features)`` read row by row with Python's csv
    module; whatever is malformed is a DataError that says exactly what and where."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError("the file is empty")
        header = [name.strip() for name in header]
        if label_column not in header:
            raise DataError(f"no label column {label_column!r} (columns: {', '.join(header[:20])})")
        label_at = header.index(label_column)
        keep = [i for i in range(len(header)) if i != label_at]
        if not keep:
            raise DataError("no feature columns besides the label")
        labels: list[str] = []
        rows: list[list[str]] = []
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"line {line}: {len(row)} fields, the header has {len(header)}")
            labels.append(row[label_at].strip())
            rows.append([row[i] for i in keep])
    if not rows:
        raise DataError("no data rows")
    feature_names = [header[i] for i in keep]
    try:
        x = np.asarray(rows, dtype=np.float32)
    except ValueError:
        raise DataError(_first_bad_cell(rows, feature_names)) from None
    if not np.isfinite(x).all():
        col = int(np.argwhere(~np.isfinite(x))[0][1])
        raise DataError(f"column {feature_names[col]!r} has a value that is not a finite number")
    return feature_names, labels, x


def _first_bad_cell(rows: list[list[str]], names: list[str]) -> str:
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            try:
                float(cell)
            except ValueError:
                return f"column {names[c]!r} is not numeric (data row {r + 1}: {cell[:40]!r})"
    return "a feature value is not numeric"


class CsvFormat:
    """``csv``: :func:`check_csv` and :func:`load_csv`."""

    def check(self, stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
        return check_csv(stream, options.label_column)

    def load(self, path: Path, spec: DataSpec, label_column: str) -> Table:
        if spec.task == "regression":
            return load_csv_regression(path, label_column)
        return load_csv(path, label_column)

    def index(self, path: Path, spec: DataSpec, label_column: str) -> Index:
        table = load_csv(path, label_column)
        return Index(
            labels=table.labels, classes=table.classes, feature_names=table.feature_names, label_column=label_column
        )

    def scan(self, path: Path, spec: DataSpec, label_column: str, rows: np.ndarray) -> Blocks:
        """A CSV has no index to seek by: it is parsed whole, and ``rows`` taken from it."""
        return scan_table(load_csv(path, label_column), rows)

    def preview(self, path: Path, spec: DataSpec, label_column: str) -> Preview:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            rows = []
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append(cells(list(row)))
                if len(rows) >= PREVIEW_ROWS:
                    break
        return Preview(columns=shown_columns([name.strip() for name in header]), rows=rows)


FORMATS.add(CSV, CsvFormat())
