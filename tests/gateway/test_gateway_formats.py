"""POST /datasets in every format, against real NATS, PostgreSQL, the projector and a file:// blob
store: recognised from the content, confirmed by ``format``; a bad file is a 400 with its reason,
and leaves no blob and no event behind."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from PIL import Image

from swarmtrain.common.settings import Settings
from swarmtrain.gateway import create_app
from tests.gateway.helpers import Client, Headers, serving, sign_up_and_in, small_csv, stored_objects
from tests.training.formatdata import (
    archive,
    corpus,
    digit_images,
    digits_npz,
    jsonl,
    npz_bytes,
    parquet_bytes,
    png,
    table_parquet,
)


async def post(client: Client, headers: Headers, raw: bytes, name: str, **form: str) -> tuple[int, dict[str, object]]:
    r = await client.post(
        "/datasets", files={"file": (name, raw, "application/octet-stream")}, data=form, headers=headers
    )
    return r.status_code, r.json()


@pytest.mark.parametrize("confirm", [False, True])
async def test_parquet_and_npz_are_recognised_and_shown(
    client: Client, alice: Headers, blob_dir: Path, confirm: bool
) -> None:
    raw = table_parquet(rows=90, classes=3, row_group_size=20)
    status, body = await post(client, alice, raw, "t.parquet", **({"format": "parquet"} if confirm else {}))
    assert status == 201, body
    assert (body["format"], body["rows"], body["features"], body["classes"]) == ("parquet", 90, 6, 3)
    assert body["shape"] == [6] and body["class_counts"] == {"c0": 30, "c1": 30, "c2": 30}
    assert body["sha256"] == hashlib.sha256(raw).hexdigest()
    assert (blob_dir / "datasets" / f"{body['dataset_id']}.parquet").read_bytes() == raw

    images = digits_npz(channels_last=True)
    status, body = await post(client, alice, images, "digits.npz", **({"format": "npz"} if confirm else {}))
    assert status == 201, body
    assert (body["format"], body["rows"], body["features"], body["classes"]) == ("npz", 1797, 64, 10)
    assert body["shape"] == [1, 8, 8] and body["label_column"] == "y"
    assert sum(body["class_counts"].values()) == 1797  # type: ignore[attr-defined]
    shown = (await client.get(f"/datasets/{body['dataset_id']}", headers=alice)).json()
    assert {k: shown[k] for k in ("format", "shape", "class_counts", "rows")} == {
        k: body[k] for k in ("format", "shape", "class_counts", "rows")
    }
    assert len(stored_objects(blob_dir)) == 2


async def test_a_folder_of_images_resized_to_image_size(client: Client, alice: Headers, blob_dir: Path) -> None:
    raw = archive(digit_images(60, root="digits/"), "tar.gz")
    status, body = await post(client, alice, raw, "digits.tar.gz", format="images", image_size="4x6")
    assert status == 201, body
    assert (body["format"], body["rows"], body["features"], body["classes"]) == ("images", 60, 24, 10)
    assert body["shape"] == [1, 4, 6] and body["label_column"] == "class"
    assert stored_objects(blob_dir) == [blob_dir / "datasets" / f"{body['dataset_id']}.archive"]
    status, bad = await post(client, alice, raw, "d.tgz", image_size="4x")
    assert status == 400 and "image_size must be HxW" in str(bad["detail"])


async def test_a_text_corpus_in_bytes_or_a_bpe_stored_beside_it(client: Client, alice: Headers, blob_dir: Path) -> None:
    lines = corpus(120)
    raw = ("\n".join(lines) + "\n").encode()
    status, body = await post(client, alice, raw, "c.txt", format="text")
    assert status == 201, body
    assert (body["format"], body["rows"], body["tokens"]) == ("text", 120, len(raw))  # a newline a row
    assert body["target"] == "language_modeling"
    assert body["tokenizer"] == {"kind": "byte", "vocab_size": 256, "uri": "", "sha256": ""}
    assert stored_objects(blob_dir) == [blob_dir / "datasets" / f"{body['dataset_id']}.text"]

    status, bpe = await post(client, alice, jsonl(lines), "c.jsonl", vocab_size="290")
    assert status == 201, bpe
    tokenizer = bpe["tokenizer"]
    assert bpe["format"] == "text" and tokenizer["kind"] == "bpe" and 0 < bpe["tokens"] < body["tokens"]  # type: ignore[index, operator]
    stored = blob_dir / "datasets" / f"{bpe['dataset_id']}.tokenizer.json"
    assert tokenizer["uri"].endswith(f"datasets/{bpe['dataset_id']}.tokenizer.json")  # type: ignore[index]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == tokenizer["sha256"]  # type: ignore[index]
    assert (await client.get(f"/datasets/{bpe['dataset_id']}", headers=alice)).json()["tokenizer"] == tokenizer

    session = {
        "dataset_id": body["dataset_id"],
        "num_peers": 1,
        "hyperparameters": [{"epochs": 1, "batch_size": 8, "lr": 0.01}],
    }
    r = await client.post("/sessions", json=session, headers=alice)  # the default model, an mlp
    assert r.status_code == 400 and "use a transformer" in r.json()["detail"], r.text
    lm = {**session, "model": {"kind": "transformer", "layers": 1, "d_model": 16, "heads": 2, "context": 16}}
    r = await client.post("/sessions", json={**lm, "dataset_id": bpe["dataset_id"]}, headers=alice)
    assert r.status_code == 400 and "BPE" in r.json()["detail"], r.text
    r = await client.post("/sessions", json={**lm, "model": {**lm["model"], "context": 8192}}, headers=alice)
    assert r.status_code == 400 and "window" in r.json()["detail"], r.text
    r = await client.post("/sessions", json={**lm, "queue": True}, headers=alice)
    assert r.status_code == 201, r.text  # a language model on the corpus's windows (queued: no peer here)


async def test_a_csv_is_as_before(client: Client, alice: Headers, blob_dir: Path) -> None:
    raw = small_csv(rows=12, classes=3)
    status, body = await post(client, alice, raw, "s.csv")
    assert status == 201, body
    assert (body["format"], body["shape"]) == ("csv", [2])
    assert stored_objects(blob_dir) == [blob_dir / "datasets" / f"{body['dataset_id']}.csv"]


def _zip(**members: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name.replace("__", "/").replace("DOTDOT", ".."), data)
    return out.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


BOMB = _zip(**{"x.npy": _npy(np.zeros((1 << 19, 4))), "y.npy": _npy(np.arange(1 << 19) % 2)})
"""Declares 20 MiB uncompressed in a few tens of KiB: over the 8 MiB these tests allow."""


@pytest.mark.parametrize(
    ("raw", "form", "needle"),
    [
        (BOMB, {}, "uncompressed"),
        (_zip(**{"x.npy": _npy(np.zeros((20, 2))), "y.npy": _npy(np.arange(20) % 2), "DOTDOT__e.npy": b""}), {}, ".."),
        (_zip(**{"x.npy": _npy(np.array([None] * 20, dtype=object)), "y.npy": _npy(np.arange(20) % 2)}), {}, "objects"),
        (table_parquet()[:200] + b"PAR1", {}, "Parquet"),
        (parquet_bytes({"a": np.zeros(20), "label": ["x"] * 20}), {}, "fewer than 2 classes"),
        (small_csv(), {"format": "parquet"}, "not a Parquet file"),
        (table_parquet(), {"format": "npz"}, "uploaded as npz but its content is parquet"),
        (small_csv(), {"format": "xls"}, "format 'xls': one of csv, parquet, npz"),
        (
            npz_bytes(x=np.zeros((20, 2)), y=np.arange(20) % 2),
            {"format": "csv"},
            "uploaded as csv but its content is npz",
        ),
        (b"a,b,label\n" + "1,2,é\n".encode("latin-1") * 20, {}, "not UTF-8"),
        (archive({**digit_images(20), "3/readme.png": b"hello"}), {}, "'3/readme.png' is not a PNG or JPEG image"),
        ("caf\u00e9 au lait\n".encode("latin-1") * 30, {"format": "text"}, "not UTF-8 text"),
        (jsonl(corpus(30)), {"vocab_size": "20"}, "vocab_size must be 257"),
        (
            archive({**digit_images(20), "9/big.png": png(np.zeros((9, 9), dtype=np.uint8))}),
            {"format": "images"},
            "the images have 2 sizes (8x8, 9x9): give image_size",
        ),
    ],
    ids=[
        "zip-bomb",
        "dotdot",
        "object-array",
        "corrupt-parquet",
        "one-class",
        "csv-as-parquet",
        "parquet-as-npz",
        "unknown-format",
        "npz-as-csv",
        "not-utf8",
        "not-an-image",
        "text-not-utf8",
        "tiny-vocab",
        "mixed-sizes",
    ],
)
async def test_a_bad_file_is_400_and_leaves_no_blob_and_no_event(
    settings: Settings, projector: None, blob_dir: Path, raw: bytes, form: dict[str, str], needle: str
) -> None:
    app = create_app(msgspec.structs.replace(settings, max_uncompressed_mb=8))
    async with serving(app) as client:
        alice = await sign_up_and_in(client, "alice@example.com")
        status, body = await post(client, alice, raw, "f.bin", **form)
        assert status == 400, body
        assert needle in str(body["detail"]) and body["title"] == "Bad Request"
        assert stored_objects(blob_dir) == []
        # a good upload after it is the only dataset: no event of the refused one was appended
        # before it (the projector applies the log in order)
        status, good = await post(client, alice, small_csv(), "good.csv")
        assert status == 201, good
        listed = (await client.get("/datasets", headers=alice)).json()
        assert [d["dataset_id"] for d in listed] == [good["dataset_id"]]
        assert len(stored_objects(blob_dir)) == 1


async def test_a_preview_of_every_format(client: Client, alice: Headers) -> None:
    async def preview(raw: bytes, name: str, **form: str) -> dict[str, Any]:
        status, body = await post(client, alice, raw, name, **form)
        assert status == 201, body
        r = await client.get(f"/datasets/{body['dataset_id']}/preview", headers=alice)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        assert out["format"] == body["format"] and out["class_counts"] == body["class_counts"]
        return out

    csv = await preview(small_csv(rows=12, classes=3), "s.csv")
    assert csv["columns"] == ["a", "b", "label"] and len(csv["rows"]) == 10 and csv["rows"][0][0] == "0"

    table = await preview(table_parquet(rows=30), "t.parquet")
    assert table["columns"] == ["f0", "f1", "f2", "f3", "colour", "label"]
    assert [row[4:] for row in table["rows"][:2]] == [["red", "c0"], ["green", "c1"]]

    arrays = await preview(digits_npz(), "d.npz")
    assert arrays["columns"][:3] == ["y", "x0", "x1"] and arrays["columns"][-1] == "..."
    assert [row[0] for row in arrays["rows"][:3]] == ["0", "1", "2"]

    images = await preview(archive(digit_images(60)), "d.zip")
    assert sorted(images["thumbnails"]) == [str(d) for d in range(10)]
    assert all(1 <= len(v) <= 4 for v in images["thumbnails"].values())
    first = Image.open(io.BytesIO(base64.b64decode(images["thumbnails"]["0"][0])))
    assert (first.format, first.size, first.mode) == ("PNG", (8, 8), "L")

    lines = corpus(30)
    text = await preview(jsonl(lines), "c.jsonl")
    assert text["lines"] == lines[:10] and text["tokens"] == len("".join(line + "\n" for line in lines).encode())
