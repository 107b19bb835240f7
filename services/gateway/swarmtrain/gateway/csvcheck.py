"""Incremental validation of an uploaded training CSV: one pass, line by line, bounded memory.

A training CSV has a header row, a label column (any values, at least two distinct ones) and only
numeric feature columns. ``check_csv`` reads a binary stream through the csv module and either
returns what it found or raises ``CsvRejected`` with a message a person can act on.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from typing import BinaryIO

import msgspec

MIN_ROWS = 10
MIN_CLASSES = 2
MAX_CLASSES = 10_000
MAX_LINE_CHARS = 1 << 20
_READ_CHUNK = 1 << 16


class CsvRejected(ValueError):
    """The upload is not a usable training CSV; ``str(exc)`` says why."""


class CsvSummary(msgspec.Struct, frozen=True, kw_only=True):
    rows: int
    features: int
    classes: int
    columns: list[str]


class _Raw(io.RawIOBase):
    """Adapts any binary stream to RawIOBase (for TextIOWrapper) without closing it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _lines(text: io.TextIOWrapper) -> Iterator[str]:
    number = 0
    while line := text.readline(MAX_LINE_CHARS):
        number += 1
        if "\x00" in line:
            raise CsvRejected(f"not a CSV file: line {number} contains NUL bytes (a binary file?)")
        if len(line) >= MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            raise CsvRejected(f"not a CSV file: line {number} is longer than {MAX_LINE_CHARS} characters")
        yield line


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def check_csv(stream: BinaryIO, label_column: str = "label") -> CsvSummary:
    """Validate a CSV read from ``stream`` (from its current position); raises ``CsvRejected``."""
    text = io.TextIOWrapper(io.BufferedReader(_Raw(stream), _READ_CHUNK), encoding="utf-8-sig", newline="")
    reader = csv.reader(_lines(text), strict=True)
    try:
        with text:
            return _check_rows(reader, label_column)
    except UnicodeDecodeError:
        raise CsvRejected("not a CSV file: it is not UTF-8 text (a binary file?)") from None
    except csv.Error as exc:
        raise CsvRejected(f"not a CSV file: {exc} (line {reader.line_num})") from None


def _header(reader: Iterator[list[str]], label_column: str) -> tuple[list[str], int]:
    header = next((row for row in reader if row), None)
    if header is None:
        raise CsvRejected("not a CSV file: it is empty")
    columns = [name.strip() for name in header]
    seen: set[str] = set()
    for position, name in enumerate(columns, start=1):
        if not name:
            raise CsvRejected(f"not a CSV file: header column {position} has no name")
        if name in seen:
            raise CsvRejected(f"not a CSV file: the header names column {name!r} twice")
        seen.add(name)
    if label_column not in seen:
        shown = ", ".join(repr(c) for c in columns[:20]) + (", ..." if len(columns) > 20 else "")
        raise CsvRejected(f"no label column {label_column!r}: the header has {shown}")
    if len(columns) < 2:
        raise CsvRejected(f"no feature columns: the header has only the label column {label_column!r}")
    return columns, columns.index(label_column)


def _check_rows(reader: Iterator[list[str]], label_column: str) -> CsvSummary:
    columns, label_at = _header(reader, label_column)
    features = [(i, name) for i, name in enumerate(columns) if i != label_at]
    width = len(columns)
    labels: set[str] = set()
    rows = 0
    for row in reader:
        if not row or row == [""]:
            continue  # a blank line
        rows += 1
        if len(row) != width:
            raise CsvRejected(f"not a CSV file: row {rows} has {len(row)} fields but the header has {width}")
        for i, name in features:
            if not _is_number(row[i]):
                raise CsvRejected(
                    f"non-numeric feature: column {name!r}, row {rows}: {row[i].strip()[:40]!r} is not a number"
                )
        label = row[label_at].strip()
        if not label:
            raise CsvRejected(f"empty label: column {label_column!r}, row {rows}")
        labels.add(label)
        if len(labels) > MAX_CLASSES:
            raise CsvRejected(f"more than {MAX_CLASSES} classes in {label_column!r}: is it really a class label?")
    if rows < MIN_ROWS:
        raise CsvRejected(f"too few rows: {rows} data rows, at least {MIN_ROWS} are needed")
    if len(labels) < MIN_CLASSES:
        raise CsvRejected(
            f"fewer than {MIN_CLASSES} classes: the label column {label_column!r} has {len(labels)} distinct value"
        )
    return CsvSummary(rows=rows, features=len(features), classes=len(labels), columns=columns)
