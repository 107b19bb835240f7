"""A shard read gives exactly the rows a whole read slices: per format, the same rows in the same
order with the same values (``data.read_rows``, ``sharding.read_shard``), and the streamed
``Standardize`` rule gives the same bits however its rows arrive."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from swarmtrain.common.events import DataSpec
from swarmtrain.common.fedopts import ShardingSpec
from swarmtrain.training import stats
from swarmtrain.training.data import DataError, load, read_index, read_rows, scan, split_indices
from swarmtrain.training.formats import base
from swarmtrain.training.sharding import make_shards, read_shard
from swarmtrain.training.stats import StreamedStats, streamed_stats
from tests.training import formatdata

IMAGES = DataSpec(format="images", image_size=[8, 8], channels=1)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _csv(tmp_path: Path) -> tuple[Path, DataSpec, str]:
    x, y = formatdata.table(300, 3)
    lines = ["f0,f1,label,f2,f3"] + [f"{r[0]},{r[1]},{c},{r[2]},{r[3]}" for r, c in zip(x, y, strict=True)]
    return _write(tmp_path, "t.csv", ("\n".join(lines) + "\n").encode()), DataSpec(), "label"


def _parquet(tmp_path: Path) -> tuple[Path, DataSpec, str]:
    rows = 700
    x, y = formatdata.table(rows, 4)
    columns: dict[str, object] = {f"f{i}": x[:, i] for i in range(4)}
    columns["n"] = np.arange(rows, dtype=np.int64) % 7
    columns["colour"] = pa.array([("red", "green", "blue")[(i * 7) % 3] for i in range(rows)]).dictionary_encode()
    columns["size"] = [("s", "m", "l", "xl")[(i * 5) % 4] for i in range(rows)]
    columns["label"] = y
    return (
        _write(tmp_path, "t.parquet", formatdata.parquet_bytes(columns, row_group_size=64)),
        DataSpec(format="parquet"),
        "label",
    )


def _npz(tmp_path: Path, channels_last: bool = False) -> tuple[Path, DataSpec, str]:
    return _write(tmp_path, "d.npz", formatdata.digits_npz(channels_last)), DataSpec(format="npz"), "y"


def _npz_stored(tmp_path: Path) -> tuple[Path, DataSpec, str]:
    images, target = formatdata.digits()
    out = io.BytesIO()
    np.savez(out, x=images.astype(">f8"), y=target)  # uncompressed, big-endian float64
    return _write(tmp_path, "s.npz", out.getvalue()), DataSpec(format="npz"), "y"


def _images(tmp_path: Path, kind: str = "zip") -> tuple[Path, DataSpec, str]:
    return _write(tmp_path, f"d.{kind}", formatdata.digits_zip(300, kind)), IMAGES, "class"


DATASETS = {
    "csv": _csv,
    "parquet": _parquet,
    "npz": _npz,
    "npz-channels-last": lambda p: _npz(p, channels_last=True),
    "npz-stored-big-endian": _npz_stored,
    "images-zip": _images,
    "images-tar.gz": lambda p: _images(p, "tar.gz"),
}


@pytest.fixture(params=sorted(DATASETS))
def dataset(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, DataSpec, str]:
    return DATASETS[request.param](tmp_path)  # type: ignore[no-any-return]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, so that every scan crosses many block (and row group) boundaries."""
    monkeypatch.setattr(base, "BLOCK_BYTES", 1000)


def test_the_index_is_the_whole_reads_labels_classes_and_names(dataset: tuple[Path, DataSpec, str]) -> None:
    path, spec, label = dataset
    whole = load(path, spec, label)
    index = read_index(path, spec, label)
    assert torch.equal(torch.from_numpy(index.labels), whole.labels)
    assert (index.classes, index.feature_names, index.label_column) == (
        whole.classes,
        whole.feature_names,
        whole.label_column,
    )


@pytest.mark.usefixtures("small_blocks")
def test_reading_rows_is_slicing_the_whole_read(dataset: tuple[Path, DataSpec, str]) -> None:
    path, spec, label = dataset
    whole = load(path, spec, label)
    n = len(whole)
    for rows in (
        torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 4],  # a random quarter, shuffled
        torch.arange(n - 1, -1, -1),  # every row, backwards
        torch.tensor([n - 1, 0]),
        torch.tensor([], dtype=torch.int64),
    ):
        got = read_rows(path, spec, label, rows, len(whole.feature_names))
        assert got.dtype == torch.float32
        assert torch.equal(got, whole.features[rows])


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("sharding", [ShardingSpec(), ShardingSpec(name="label_skew", alpha=0.5)])
def test_a_shard_read_is_the_whole_read_sliced(dataset: tuple[Path, DataSpec, str], sharding: ShardingSpec) -> None:
    path, spec, label = dataset
    whole = load(path, spec, label)
    train_idx, val_idx = split_indices(len(whole), 0.2, 7)
    cut = make_shards(sharding, train_idx, whole.labels, 4, 7)
    for k in (0, 3):
        part = read_shard(path, spec, label, validation_split=0.2, seed=7, sharding=sharding, num_shards=4, shard=k)
        rows = cut.shards[k]
        assert torch.equal(part.rows, rows)
        assert torch.equal(part.x, whole.features[rows])
        assert torch.equal(part.y, whole.labels[rows])
        assert torch.equal(part.x_val, whole.features[val_idx])
        assert torch.equal(part.y_val, whole.labels[val_idx])
        assert torch.equal(part.train_idx, train_idx)
        assert torch.equal(part.train_labels, whole.labels[train_idx])
        assert part.histograms == cut.histograms
        mean, std = streamed_stats(whole.features, train_idx)
        assert torch.equal(part.mean, mean)
        assert torch.equal(part.std, std)
        assert (part.classes, part.feature_names) == (whole.classes, whole.feature_names)


def test_parquet_labels_are_the_stripped_strings_sorted(tmp_path: Path) -> None:
    """The label codes worked out on the column's distinct values are the per-row rule's."""
    labels = [" b", "a ", "c", "a", "b", "10", "9"] * 3
    path = _write(tmp_path, "l.parquet", formatdata.parquet_bytes({"f": np.arange(21.0), "label": labels}, 5))
    index = read_index(path, DataSpec(format="parquet"), "label")
    classes, codes = base.encode_labels(np.char.strip(np.asarray(labels)))
    assert index.classes == classes == ["10", "9", "a", "b", "c"]
    assert np.array_equal(index.labels, codes)
    numbers = _write(
        tmp_path, "n.parquet", formatdata.parquet_bytes({"f": np.arange(21.0), "label": np.arange(21) % 3})
    )
    assert read_index(numbers, DataSpec(format="parquet"), "label").classes == ["0", "1", "2"]


def test_a_scan_needs_sorted_rows(dataset: tuple[Path, DataSpec, str]) -> None:
    path, spec, label = dataset
    with pytest.raises(ValueError, match="sorted"):
        list(scan(path, spec, label, np.asarray([3, 1])))
    with pytest.raises(ValueError, match="distinct"):
        read_rows(path, spec, label, torch.tensor([1, 1]), 4)


def test_a_text_corpus_is_read_as_windows_of_a_context(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.txt", "\n".join(formatdata.corpus(20)).encode())
    with pytest.raises(DataError, match="context"):
        read_index(path, DataSpec(format="text"), "text")  # no context: no windows
    assert read_index(path, DataSpec(format="text", context=8), "text").rows > 0


def test_a_parquet_shard_skips_row_groups_it_has_no_row_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, spec, label = _parquet(tmp_path)
    read: list[list[int]] = []
    original = pq.ParquetFile.iter_batches

    def counted(self: pq.ParquetFile, *args: object, **kwargs: object) -> object:
        read.append(list(kwargs.get("row_groups") or []))  # type: ignore[call-overload]
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    whole = load(path, spec, label)
    rows = torch.arange(130, 200)  # row groups of 64: groups 2 and 3
    assert torch.equal(read_rows(path, spec, label, rows, len(whole.feature_names)), whole.features[rows])
    assert read == [[2], [3]]


# ------------------------------------------------------------------ the streamed Standardize rule


def test_the_streamed_statistics_do_not_depend_on_how_the_rows_arrive() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3 * stats.CHUNK_ROWS + 123, 5)) * [1, 10, 1e-9, 0, 3] + [0, 5, 1, 2, -4]).astype(np.float32)
    whole = StreamedStats(5)
    whole.add(x)
    pieces = StreamedStats(5)
    at = 0
    for size in (1, 7, stats.CHUNK_ROWS - 3, 5000, 99999):
        pieces.add(x[at : at + size])
        at += size
    mean, std = whole.result()
    assert all(torch.equal(a, b) for a, b in zip((mean, std), pieces.result(), strict=True))
    assert torch.allclose(mean.double(), torch.from_numpy(x.astype(np.float64).mean(axis=0)), atol=1e-5)
    assert torch.allclose(std[[0, 1, 4]].double(), torch.from_numpy(x.astype(np.float64).std(axis=0))[[0, 1, 4]])
    assert std[2] == 1.0 and std[3] == 1.0  # (near-)constant features: std 1, as Standardize.fit gives them


def test_streamed_statistics_of_rows_in_memory_take_them_ascending() -> None:
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(500, 3)).astype(np.float32))
    rows = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:300]
    one = StreamedStats(3)
    one.add(x.numpy()[np.sort(rows.numpy())])
    assert all(torch.equal(a, b) for a, b in zip(streamed_stats(x, rows), one.result(), strict=True))
    with pytest.raises(ValueError, match="no rows"):
        StreamedStats(3).result()
