"""The label decides the target: categorical (or whole numbers) -> classes, a number with a
fraction (a float Parquet column) -> a regression target with its range; the readers read it as
float32 targets, with no classes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from swarmtrain.common.events import DataSpec
from swarmtrain.training import data
from swarmtrain.training.formats import FORMATS, Limits, Rejected, Summary, UploadOptions
from tests.training.formatdata import diabetes, diabetes_parquet, npz_bytes, parquet_bytes, table_parquet


def check(fmt: str, raw: bytes, label: str = "label") -> Summary:
    return FORMATS.get(fmt).check(io.BytesIO(raw), UploadOptions(label_column=label), Limits())


def _csv(labels: list[str]) -> bytes:
    rows = "".join(f"{i},{i * 2},{label}\n" for i, label in enumerate(labels))
    return f"a,b,label\n{rows}".encode()


def test_a_csv_with_fractional_labels_is_a_regression(tmp_path: Path) -> None:
    labels = [f"{0.5 + i * 1.25}" for i in range(40)]
    summary = check("csv", _csv(labels))
    assert (summary.target, summary.classes, summary.class_counts) == ("regression", 0, {})
    assert summary.target_range == [0.5, 0.5 + 39 * 1.25]
    assert summary.data == DataSpec(task="regression")
    path = tmp_path / "t.csv"
    path.write_bytes(_csv(labels))
    ds = data.load(path, summary.data, "label")
    assert ds.target == "regression" and ds.classes == []
    assert ds.labels.dtype.is_floating_point and ds.labels[1].item() == pytest.approx(1.75)


def test_whole_number_labels_stay_classes() -> None:
    summary = check("csv", _csv([str(i % 3) for i in range(30)]))
    assert (summary.target, summary.classes, summary.target_range) == ("classification", 3, [])
    assert summary.data == DataSpec()  # as every dataset before targets


def test_more_distinct_numbers_than_classes_can_be_is_still_a_regression() -> None:
    labels = [f"{i}.5" for i in range(10_050)]  # over MAX_CLASSES distinct values, read once
    summary = check("csv", _csv(labels))
    assert summary.target == "regression" and summary.rows == 10_050


def test_a_constant_target_is_refused() -> None:
    with pytest.raises(Rejected, match="constant"):
        check("csv", _csv(["2.5"] * 20))


def test_a_parquet_float_column_is_a_regression(tmp_path: Path) -> None:
    raw = diabetes_parquet()
    summary = check("parquet", raw, "progression")
    _, y, _ = diabetes()
    assert (summary.target, summary.rows, summary.features, summary.classes) == ("regression", 442, 10, 0)
    assert summary.target_range == [float(y.min()), float(y.max())]
    path = tmp_path / "d.parquet"
    path.write_bytes(raw)
    ds = data.load(path, summary.data, "progression")
    assert ds.target == "regression" and ds.features.shape == (442, 10)
    assert np.allclose(ds.labels.numpy(), y.astype(np.float32))
    assert check("parquet", table_parquet()).target == "classification"  # integer labels: classes


def test_a_parquet_float_target_with_a_missing_value_is_refused() -> None:
    raw = parquet_bytes({"a": np.arange(20.0), "y": [None, *np.arange(19.0).tolist()]})
    with pytest.raises(Rejected, match="missing value"):
        check("parquet", raw, "y")


def test_an_npz_of_fractional_y_is_a_regression(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    y = x.sum(axis=1).astype(np.float64)
    raw = npz_bytes(x=x, y=y)
    summary = check("npz", raw)
    assert summary.target == "regression" and summary.target_range == [float(y.min()), float(y.max())]
    path = tmp_path / "a.npz"
    path.write_bytes(raw)
    ds = data.load(path, summary.data, "y")
    assert ds.target == "regression" and np.allclose(ds.labels.numpy(), y)
    preview = FORMATS.get("npz").preview(path, summary.data, "y")
    assert preview.rows[0][0] == str(np.float32(y[0]).item())[:40]
