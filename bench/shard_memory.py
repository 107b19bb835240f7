"""Shard memory: the peak RSS of a fedavg peer's data load on a quarter shard against the same peer
on all of it (issue 21 item 3: a peer reads only what it trains on).

A seeded Parquet table of at least 1 GB (``--quick``: about 24 MB) is written row group by row
group into a temporary folder (removed at the end): float32 feature columns and a label column.
Each case is a fresh process that builds the peer's ``LocalLearner`` from a ``Train`` command, the
real peer code path (the parse cache, the format's reader, the split, the shard, the model and its
tensors on the device), and reports its peak resident set (``ru_maxrss``) and the load's seconds:

- ``shard 1/4``: ``data_read="shard"``, shard 0 of 4: the shard's rows and the validation rows
  are kept, everything else streams past;
- ``shard 1/1``: the same peer with one shard, i.e. all the training rows;
- ``whole 1/4``: ``data_read="whole"`` (sessions logged before the shard read): the whole dataset
  parsed into memory, then sliced;
- ``baseline``: the same process importing the same modules, loading nothing.

The validation split (20%) is part of what every peer holds, so a quarter shard holds 20% + 20%
of the rows against 80% + 20% for all of them: the ratio approaches 0.4 as the dataset grows.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench._common import Report, cli_output, quick

FEATURES = 64
ROW_GROUP = 1 << 16
TARGET_BYTES = 24 << 20 if quick() else 1 << 30
"""The table's feature bytes (float32): at least 1 GiB for the full run."""
CLASSES = 10
CASE_TIMEOUT_S = 120 if quick() else 1200


def write_table(path: Path, target_bytes: int = TARGET_BYTES) -> int:
    """A seeded table of ``target_bytes`` of float32 features, one row group at a time; its rows."""
    rows = -(-target_bytes // (4 * FEATURES))
    rng = np.random.default_rng(0)
    schema = pa.schema([*(pa.field(f"f{i}", pa.float32()) for i in range(FEATURES)), pa.field("label", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            y = rng.integers(0, CLASSES, size=n)
            x = rng.normal(size=(n, FEATURES)).astype(np.float32) + y[:, None].astype(np.float32)
            columns = [pa.array(x[:, i]) for i in range(FEATURES)] + [pa.array(y)]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size=ROW_GROUP)
    return rows


def child(path: Path, data_read: str, num_shards: int) -> dict[str, float]:
    """In the measured process: build the peer's learner (or nothing, ``num_shards`` 0)."""
    from swarmtrain.common.events import DataSpec, Hyperparameters, Train
    from swarmtrain.common.models import MlpSpec
    from swarmtrain.peer.strategies.fedavg import LocalLearner

    t = time.perf_counter()
    samples = 0
    if num_shards:
        command = Train(
            peer_id="bench",
            session_id="bench",
            dataset_uri="file:///unused",
            dataset_sha256="0" * 64,
            label_column="label",
            model=MlpSpec(hidden=[64]),
            hyperparameters=Hyperparameters(epochs=1, batch_size=256, lr=1e-3),
            validation_split=0.2,
            seed=1,
            output_uri="file:///unused",
            strategy="fedavg",
            shard=0,
            num_shards=num_shards,
            rounds=1,
            start_round=1,
            rounds_uri="file:///rounds",
            data=DataSpec(format="parquet"),
            data_read=data_read,  # type: ignore[arg-type]
        )
        learner = LocalLearner(path, command, device="cpu", torch_threads=1)
        samples = learner.num_samples
    seconds = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": peak_kib / 1024, "seconds": seconds, "samples": samples}


def measure(path: Path, data_read: str, num_shards: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.shard_memory", "--child", str(path), data_read, str(num_shards)],
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {data_read} {num_shards} case failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> Report:
    report = Report("shard memory")
    with tempfile.TemporaryDirectory(prefix="swarmtrain-bench-shards-") as tmp:
        path = Path(tmp) / "table.parquet"
        t = time.perf_counter()
        rows = write_table(path)
        size = path.stat().st_size
        report.extra |= {"rows": rows, "features": FEATURES, "file_bytes": size, "write_s": time.perf_counter() - t}
        print(f"dataset: {rows:,} rows x {FEATURES} float32 features, {size / 2**20:,.0f} MiB of Parquet", flush=True)
        baseline = measure(path, "shard", 0)
        quarter = measure(path, "shard", 4)
        whole_shard = measure(path, "shard", 1)
        old = measure(path, "whole", 4)
    for name, case in (("baseline", baseline), ("shard 1/4", quarter), ("shard 1/1", whole_shard), ("whole 1/4", old)):
        print(f"{name:>10}: peak {case['peak_mib']:8.0f} MiB, {case['seconds']:6.1f} s, {case['samples']:,.0f} rows")
    report.extra |= {"baseline": baseline, "quarter": quarter, "all": whole_shard, "whole_read_quarter": old}
    report.add(
        "peak RSS, quarter shard (shard read)",
        quarter["peak_mib"],
        "MiB",
        reference=whole_shard["peak_mib"],
        reference_name="the same peer on all of it",
        note=f"dataset {size / 2**20:,.0f} MiB; interpreter and imports alone {baseline['peak_mib']:.0f} MiB",
    )
    report.add(
        "peak RSS above the imports, quarter shard",
        quarter["peak_mib"] - baseline["peak_mib"],
        "MiB",
        reference=whole_shard["peak_mib"] - baseline["peak_mib"],
        reference_name="the same peer on all of it",
    )
    report.add(
        "peak RSS, quarter shard (whole read, sessions before)",
        old["peak_mib"],
        "MiB",
        reference=quarter["peak_mib"],
        reference_name="the shard read",
    )
    report.add(
        "load seconds, quarter shard (shard read)",
        quarter["seconds"],
        "s",
        reference=old["seconds"],
        reference_name="the whole read",
    )
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
    else:
        main().write(cli_output())
