"""The parquet format's two halves as plain function calls: the upload check and the reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from swarmtrain.common import formats
from swarmtrain.common.events import DataSpec
from swarmtrain.training import data
from swarmtrain.training.formats import FORMATS, Limits, Rejected, UploadOptions
from tests.training.formatdata import parquet_bytes, table, table_parquet

PARQUET = FORMATS.get("parquet")


def check(raw: bytes, label: str = "label", limits: Limits | None = None) -> object:
    return PARQUET.check(io.BytesIO(raw), UploadOptions(label_column=label), limits or Limits())


def test_numeric_and_categorical_columns_read_in_row_groups(tmp_path: Path) -> None:
    raw = table_parquet(rows=90, classes=3, row_group_size=16)
    assert formats.detect(raw[:512]) == "parquet"
    summary = check(raw)
    # four numbers and one colour, one-hot over its two values
    assert (summary.rows, summary.features, summary.classes) == (90, 6, 3)  # type: ignore[attr-defined]
    assert summary.class_counts == {"c0": 30, "c1": 30, "c2": 30}  # type: ignore[attr-defined]
    path = tmp_path / "t.parquet"
    path.write_bytes(raw)
    ds = data.load(path, DataSpec(format="parquet"), "label")
    assert ds.feature_names == ["f0", "f1", "f2", "f3", "colour=green", "colour=red"]
    x, y = table(rows=90, classes=3)
    np.testing.assert_allclose(ds.features.numpy()[:, :4], x)
    assert ds.features[:, 4:].sum(dim=1).eq(1).all()
    assert ds.classes == ["c0", "c1", "c2"]
    assert [ds.classes[i] for i in ds.labels.tolist()] == y.tolist()


def _columns(**extra: object) -> dict[str, object]:
    x, y = table(rows=20, classes=2)
    return {"a": x[:, 0], "label": y, **extra}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"PAR1" + b"\x00" * 100 + b"PAR1", "not a Parquet file"),
        (table_parquet()[:-40] + b"\x00" * 32 + b"PAR1", "Parquet"),
        (parquet_bytes({"a": np.zeros(20), "label": ["x"] * 20}), "fewer than 2 classes"),
        (parquet_bytes({"a": np.zeros(20), "target": np.arange(20) % 2}), "no label column 'label'"),
        (parquet_bytes(_columns(b=pa.array([1.0] * 19 + [None]))), "column 'b' has a missing value"),
        (parquet_bytes(_columns(b=np.array([1.0] * 19 + [np.inf]))), "column 'b', row 20: not a finite number"),
        (parquet_bytes(_columns(when=pa.array([[1]] * 20))), "column 'when' has type"),
        (parquet_bytes({"label": np.arange(20) % 2}), "no feature columns"),
    ],
)
def test_refuses_with_a_reason(raw: bytes, needle: str) -> None:
    with pytest.raises(Rejected) as caught:
        check(raw)
    assert needle in str(caught.value)


def test_the_declared_uncompressed_size_is_capped() -> None:
    with pytest.raises(Rejected, match="uncompressed"):
        check(table_parquet(rows=5000), limits=Limits(max_uncompressed_bytes=1000))
