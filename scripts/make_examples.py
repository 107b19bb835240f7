"""Write the small example datasets of ``examples/`` from what scikit-learn ships (no download):
``python scripts/make_examples.py``. Deterministic: the same bytes on every run."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_diabetes, load_digits, load_iris

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIGIT_IMAGES = 1000
"""The first this many digits go into ``digits-images.zip`` (a few hundred KB at most)."""


def main() -> None:
    iris = load_iris()
    columns: dict[str, object] = {
        name.replace(" (cm)", "").replace(" ", "_"): iris.data[:, i] for i, name in enumerate(iris.feature_names)
    }
    columns["species"] = pa.array([str(iris.target_names[t]) for t in iris.target]).dictionary_encode()
    pq.write_table(pa.table(columns), EXAMPLES / "iris.parquet")
    diabetes = load_diabetes()  # a regression: a float target column
    numbers = {name: diabetes.data[:, i].round(6) for i, name in enumerate(diabetes.feature_names)}
    numbers["progression"] = diabetes.target.astype("float64")
    pq.write_table(pa.table(numbers), EXAMPLES / "diabetes.parquet")
    digits = load_digits()
    with (EXAMPLES / "digits.npz").open("wb") as f:
        np.savez_compressed(f, x=digits.images.astype(np.uint8)[:, None, :, :], y=digits.target.astype(np.int64))
    pixels = (digits.images * 255 / 16).round().astype(np.uint8)
    with zipfile.ZipFile(EXAMPLES / "digits-images.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(DIGIT_IMAGES):
            out = io.BytesIO()
            Image.fromarray(pixels[i]).save(out, format="PNG")
            z.writestr(zipfile.ZipInfo(f"digits/{digits.target[i]}/{i:04d}.png", (1980, 1, 1, 0, 0, 0)), out.getvalue())
    lines = zen()
    (EXAMPLES / "zen.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))


def zen() -> list[str]:
    """The Zen of Python (the standard library's ``this``), one aphorism a line."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return [line for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line.strip()]


if __name__ == "__main__":
    main()
