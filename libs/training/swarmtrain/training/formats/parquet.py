"""The Parquet format: a table with one label column; every other column a feature, numeric (bool,
integers, floats) or categorical (strings or a dictionary column, one-hot encoded over its sorted
values, one feature ``<column>=<value>`` each).

The check reads the footer, caps the uncompressed size it declares, and then reads the table in
batches (bounded memory): no missing value, every number finite, at most ``MAX_CATEGORIES`` values
in a categorical column. The reader parses the file the same way on every machine.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from swarmtrain.common.events import DataSpec
from swarmtrain.training.formats.base import (
    FORMATS,
    MAX_CLASSES,
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
    check_regression,
    encode_labels,
    regression_table,
    shown_columns,
    shown_counts,
)

MAX_CATEGORIES = 1000
"""Distinct values of one categorical feature column (each is a feature)."""
_BATCH_ROWS = 1 << 16


def _kind(name: str, column_type: pa.DataType) -> str:
    """``numeric`` or ``categorical``; ``Rejected`` for a type no feature can be made of."""
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    if pa.types.is_boolean(column_type) or pa.types.is_integer(column_type) or pa.types.is_floating(column_type):
        return "numeric"
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        return "categorical"
    raise Rejected(f"column {name!r} has type {column_type}: features are numeric or categorical (strings)")


def _open(stream: BinaryIO | Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(stream)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise Rejected(f"not a Parquet file (or a corrupt one): {str(exc)[:300]}") from None


def _strings(column: pa.Array | pa.ChunkedArray) -> list[str]:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return [str(v) for v in column.to_pylist()]


def _numbers(name: str, column: pa.Array | pa.ChunkedArray, offset: int) -> np.ndarray:
    if column.null_count:
        raise Rejected(f"column {name!r} has a missing value (near row {offset + 1})")
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    values: np.ndarray = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    if not np.isfinite(values).all():
        at = int(np.argwhere(~np.isfinite(values))[0][0])
        raise Rejected(f"column {name!r}, row {offset + at + 1}: not a finite number")
    return values


def _columns(schema: pa.Schema, label_column: str) -> list[tuple[str, str]]:
    names = list(schema.names)
    if len(set(names)) != len(names):
        raise Rejected("the table names a column twice")
    if label_column not in names:
        shown = ", ".join(repr(c) for c in names[:20]) + (", ..." if len(names) > 20 else "")
        raise Rejected(f"no label column {label_column!r}: the table has {shown}")
    features = [(n, _kind(n, schema.field(n).type)) for n in names if n != label_column]
    if not features:
        raise Rejected(f"no feature columns: the table has only the label column {label_column!r}")
    return features


def check_parquet(stream: BinaryIO, label_column: str, limits: Limits) -> Summary:
    table = _open(stream)
    with table:
        meta = table.metadata
        check_declared_size(sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)), limits)
        features = _columns(table.schema_arrow, label_column)
        categories: dict[str, set[str]] = {n: set() for n, kind in features if kind == "categorical"}
        counts: Counter[str] = Counter()
        target = Target() if is_regression(table.schema_arrow, label_column) else None
        rows = 0
        try:
            for batch in table.iter_batches(batch_size=_BATCH_ROWS):
                labels = batch.column(label_column)
                if labels.null_count:
                    raise Rejected(f"empty label: column {label_column!r} has a missing value (near row {rows + 1})")
                if target is not None:
                    target.see_numbers(_numbers(label_column, labels, rows))
                    labels = labels.slice(0, 0)
                for label in _strings(labels):
                    if not label.strip():
                        raise Rejected(f"empty label: column {label_column!r}, near row {rows + 1}")
                    counts[label.strip()] += 1
                if len(counts) > MAX_CLASSES:
                    raise Rejected(f"more than {MAX_CLASSES} classes in {label_column!r}: is it really a class label?")
                for name, kind in features:
                    column = batch.column(name)
                    if kind == "numeric":
                        _numbers(name, column, rows)
                        continue
                    if column.null_count:
                        raise Rejected(f"column {name!r} has a missing value (near row {rows + 1})")
                    categories[name].update(_strings(pc.unique(column)))
                    if len(categories[name]) > MAX_CATEGORIES:
                        raise Rejected(
                            f"column {name!r} has more than {MAX_CATEGORIES} distinct values: too many categories"
                        )
                rows += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise Rejected(f"a corrupt Parquet file: {str(exc)[:300]}") from None
    width = sum(len(categories[n]) if kind == "categorical" else 1 for n, kind in features)
    if target is not None:
        return Summary(
            rows=rows,
            features=width,
            classes=0,
            columns=[n for n, _ in features] + [label_column],
            label_column=label_column,
            shape=[width],
            data=DataSpec(format="parquet", task="regression"),
            target="regression",
            target_range=check_regression(target, rows, label_column),
        )
    check_classes(counts, rows, label_column)
    return Summary(
        rows=rows,
        features=width,
        classes=len(counts),
        columns=[n for n, _ in features] + [label_column],
        label_column=label_column,
        shape=[width],
        class_counts=shown_counts(counts),
        data=DataSpec(format="parquet"),
    )


def _label_codes(labels: pa.Array | pa.ChunkedArray, label_column: str) -> tuple[list[str], np.ndarray]:
    """``(classes, class index per row)``: ``encode_labels`` of the stripped label strings, worked
    out on the column's distinct values (no Python string a row)."""
    if labels.null_count:
        raise Rejected(f"column {label_column!r} has a missing value")
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks() if labels.num_chunks else pa.array([], type=labels.type)
    if pa.types.is_dictionary(labels.type):
        labels = labels.cast(labels.type.value_type)
    encoded = labels.dictionary_encode()
    classes, of_value = encode_labels(np.char.strip(np.asarray(_strings(encoded.dictionary))))
    indices = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    return classes, of_value[indices] if len(indices) else np.zeros(0, dtype=np.int64)


def _levels_of(column: pa.Array | pa.ChunkedArray) -> set[str]:
    return set(np.asarray(_strings(column)).tolist())


def _names(features: list[tuple[str, str]], levels: dict[str, list[str]]) -> list[str]:
    names: list[str] = []
    for name, kind in features:
        names.extend([name] if kind == "numeric" else [f"{name}={level}" for level in levels[name]])
    return names


def _matrix(
    part: pa.Table | pa.RecordBatch, features: list[tuple[str, str]], levels: dict[str, list[str]]
) -> np.ndarray:
    """``part``'s rows as float32 features: numeric columns as they are, categorical ones one-hot
    over the whole column's sorted ``levels`` (so a part's rows are the whole table's)."""
    blocks: list[np.ndarray] = []
    for name, kind in features:
        column = part.column(name)
        if kind == "numeric":
            blocks.append(_numbers(name, column, 0).astype(np.float32)[:, None])
            continue
        values = np.asarray(_strings(column))
        blocks.append((values[:, None] == np.asarray(levels[name])[None, :]).astype(np.float32))
    return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32)


def _levels(table: pq.ParquetFile, features: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Every categorical column's sorted values, read row group by row group (those columns only)."""
    categorical = [name for name, kind in features if kind == "categorical"]
    found: dict[str, set[str]] = {name: set() for name in categorical}
    if categorical:
        for g in range(table.metadata.num_row_groups):
            group = table.read_row_group(g, columns=categorical)
            for name in categorical:
                found[name] |= _levels_of(pc.unique(group.column(name)))
    return {name: sorted(values) for name, values in found.items()}


def is_regression(schema: pa.Schema, label_column: str) -> bool:
    """A floating-point label column is a number to predict (a regression target); any other, classes."""
    if label_column not in schema.names:
        return False
    label_type = schema.field(label_column).type
    if pa.types.is_dictionary(label_type):
        return False
    return bool(pa.types.is_floating(label_type))


def load_parquet(path: Path, label_column: str) -> Table:
    try:
        table = pq.read_table(path)
        features = _columns(table.schema, label_column)
        if is_regression(table.schema, label_column):
            labels = table.column(label_column)
            if labels.null_count:
                raise Rejected(f"column {label_column!r} has a missing value")
            levels = {n: sorted(_levels_of(table.column(n))) for n, kind in features if kind == "categorical"}
            return regression_table(
                _matrix(table, features, levels),
                _numbers(label_column, labels, 0),
                _names(features, levels),
                label_column,
            )
        classes, y = _label_codes(table.column(label_column), label_column)
        levels = {n: sorted(_levels_of(table.column(n))) for n, kind in features if kind == "categorical"}
        x = _matrix(table, features, levels)
    except Rejected as exc:
        raise DataError(str(exc)) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"the Parquet file cannot be read: {str(exc)[:300]}") from None
    return Table(
        features=x, labels=y, classes=classes, feature_names=_names(features, levels), label_column=label_column
    )


def index_parquet(path: Path, label_column: str) -> Index:
    """The label column and the categorical columns' values: no numeric column is read."""
    try:
        with pq.ParquetFile(path) as table:
            features = _columns(table.schema_arrow, label_column)
            classes, y = _label_codes(table.read(columns=[label_column]).column(label_column), label_column)
            levels = _levels(table, features)
    except Rejected as exc:
        raise DataError(str(exc)) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"the Parquet file cannot be read: {str(exc)[:300]}") from None
    return Index(labels=y, classes=classes, feature_names=_names(features, levels), label_column=label_column)


def scan_parquet(path: Path, label_column: str, rows: np.ndarray) -> Blocks:
    """``rows``' features, row group by row group (a group without one of them is not read), each
    group in batches of about ``BLOCK_BYTES``: the table is never whole in memory."""
    try:
        with pq.ParquetFile(path) as table:
            features = _columns(table.schema_arrow, label_column)
            levels = _levels(table, features)
            columns = [name for name, _ in features]
            step = block_rows(8 * len(_names(features, levels)))
            start = 0
            for g in range(table.metadata.num_row_groups):
                count = table.metadata.row_group(g).num_rows
                first, last = np.searchsorted(rows, [start, start + count])
                if first < last:
                    offset = start
                    for batch in table.iter_batches(batch_size=step, row_groups=[g], columns=columns):
                        lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
                        if lo < hi:
                            wanted = rows[lo:hi]
                            yield wanted, _matrix(batch.take(pa.array(wanted - offset)), features, levels)
                        offset += batch.num_rows
                start += count
    except Rejected as exc:
        raise DataError(str(exc)) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"the Parquet file cannot be read: {str(exc)[:300]}") from None


class ParquetFormat:
    """``parquet``: numeric and categorical feature columns, one label column."""

    def check(self, stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
        return check_parquet(stream, options.label_column, limits)

    def load(self, path: Path, spec: DataSpec, label_column: str) -> Table:
        return load_parquet(path, label_column)

    def index(self, path: Path, spec: DataSpec, label_column: str) -> Index:
        return index_parquet(path, label_column)

    def scan(self, path: Path, spec: DataSpec, label_column: str, rows: np.ndarray) -> Blocks:
        return scan_parquet(path, label_column, rows)

    def preview(self, path: Path, spec: DataSpec, label_column: str) -> Preview:
        with pq.ParquetFile(path) as table:
            batch = next(table.iter_batches(batch_size=PREVIEW_ROWS), None)
            names = list(table.schema_arrow.names)
        rows = [] if batch is None else [cells(list(r.values())) for r in batch.to_pylist()]
        return Preview(columns=shown_columns(names), rows=rows)


FORMATS.add("parquet", ParquetFormat())
