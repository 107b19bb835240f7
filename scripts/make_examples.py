"""Write the small example datasets of ``examples/`` from what scikit-learn ships (no download):
``python scripts/make_examples.py``. Deterministic: the same bytes on every run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits, load_iris

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main() -> None:
    iris = load_iris()
    columns: dict[str, object] = {
        name.replace(" (cm)", "").replace(" ", "_"): iris.data[:, i] for i, name in enumerate(iris.feature_names)
    }
    columns["species"] = pa.array([str(iris.target_names[t]) for t in iris.target]).dictionary_encode()
    pq.write_table(pa.table(columns), EXAMPLES / "iris.parquet")
    digits = load_digits()
    with (EXAMPLES / "digits.npz").open("wb") as f:
        np.savez_compressed(f, x=digits.images.astype(np.uint8)[:, None, :, :], y=digits.target.astype(np.int64))


if __name__ == "__main__":
    main()
