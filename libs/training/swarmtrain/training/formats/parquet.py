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
    DataError,
    Limits,
    Preview,
    Rejected,
    Summary,
    Table,
    Target,
    UploadOptions,
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
        labels = table.column(label_column)
        if labels.null_count:
            raise Rejected(f"column {label_column!r} has a missing value")
        names: list[str] = []
        blocks: list[np.ndarray] = []
        for name, kind in features:
            column = table.column(name)
            if kind == "numeric":
                blocks.append(_numbers(name, column, 0).astype(np.float32)[:, None])
                names.append(name)
                continue
            values = np.asarray(_strings(column))
            levels = sorted(set(values.tolist()))
            blocks.append((values[:, None] == np.asarray(levels)[None, :]).astype(np.float32))
            names.extend(f"{name}={level}" for level in levels)
        if is_regression(table.schema, label_column):
            return regression_table(
                np.concatenate(blocks, axis=1), _numbers(label_column, labels, 0), names, label_column
            )
        classes, y = encode_labels(np.char.strip(np.asarray(_strings(labels))))
    except Rejected as exc:
        raise DataError(str(exc)) from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"the Parquet file cannot be read: {str(exc)[:300]}") from None
    return Table(
        features=np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32),
        labels=y,
        classes=classes,
        feature_names=names,
        label_column=label_column,
    )


class ParquetFormat:
    """``parquet``: numeric and categorical feature columns, one label column."""

    def check(self, stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
        return check_parquet(stream, options.label_column, limits)

    def load(self, path: Path, spec: DataSpec, label_column: str) -> Table:
        return load_parquet(path, label_column)

    def preview(self, path: Path, spec: DataSpec, label_column: str) -> Preview:
        with pq.ParquetFile(path) as table:
            batch = next(table.iter_batches(batch_size=PREVIEW_ROWS), None)
            names = list(table.schema_arrow.names)
        rows = [] if batch is None else [cells(list(r.values())) for r in batch.to_pylist()]
        return Preview(columns=shown_columns(names), rows=rows)


FORMATS.add("parquet", ParquetFormat())
