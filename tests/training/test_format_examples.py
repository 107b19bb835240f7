"""The example of every format in ``examples/`` passes its format's check with the figures the
README shows, and is what ``scripts/make_examples.py`` writes."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from swarmtrain.common import formats
from swarmtrain.training.formats import FORMATS, Limits, UploadOptions

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("name", "label", "expected"),
    [
        ("digits.csv", "label", ("csv", 1797, 64, 10, [64])),
        ("iris.parquet", "species", ("parquet", 150, 4, 3, [4])),
        ("diabetes.parquet", "progression", ("parquet", 442, 10, 0, [10])),
        ("digits.npz", "label", ("npz", 1797, 64, 10, [1, 8, 8])),
        ("digits-images.zip", "label", ("images", 1000, 64, 10, [1, 8, 8])),
        ("zen.jsonl", "label", ("text", 19, 0, 0, [])),
    ],
)
def test_every_example_passes_its_check(name: str, label: str, expected: tuple[object, ...]) -> None:
    raw = (EXAMPLES / name).read_bytes()
    assert len(raw) < 400_000  # a few hundred KB at most
    members = zipfile.ZipFile(io.BytesIO(raw)).namelist() if formats.is_zip(raw) else None
    data_format = formats.detect(raw[: formats.SNIFF_BYTES], members)
    summary = FORMATS.get(data_format).check(io.BytesIO(raw), UploadOptions(label_column=label), Limits())
    assert (data_format, summary.rows, summary.features, summary.classes, summary.shape) == expected
    if name == "diabetes.parquet":
        assert (summary.target, summary.target_range) == ("regression", [25.0, 346.0])
    if name == "iris.parquet":
        assert summary.class_counts == {"setosa": 50, "versicolor": 50, "virginica": 50}
