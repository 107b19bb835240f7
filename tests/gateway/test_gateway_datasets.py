"""POST /datasets against real NATS, PostgreSQL, the projector and a file:// blob store."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from swarmtrain.common.settings import Settings
from swarmtrain.gateway import create_app
from tests.gateway.helpers import Client, Headers, serving, sign_up_and_in, small_csv, stored_objects, upload


async def test_upload_digits(client: Client, alice: Headers, digits_csv: bytes, blob_dir: Path) -> None:
    r = await upload(client, alice, digits_csv)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["rows"], body["features"], body["classes"]) == (1797, 64, 10)
    assert body["sha256"] == hashlib.sha256(digits_csv).hexdigest()
    assert body["size_bytes"] == len(digits_csv)
    stored = blob_dir / "datasets" / f"{body['dataset_id']}.csv"
    assert stored_objects(blob_dir) == [stored]
    assert stored.read_bytes() == digits_csv


async def test_upload_with_another_label_column(client: Client, alice: Headers) -> None:
    data = b"a,b,target\n" + b"".join(b"%d,2,t%d\n" % (i, i % 3) for i in range(10))
    r = await upload(client, alice, data, label_column="target")
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == 3


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (bytes(range(256)) * 50, "not a CSV file"),
        (b"a,b,label\n" + b"1,2,x\n1,2\n" * 10, "not a CSV file: row 2 has 2 fields"),
        (small_csv().replace(b"label", b"class"), "no label column 'label'"),
        (small_csv().replace(b"\n3,", b"\nthree,"), "non-numeric feature: column 'a', row 4"),
        (small_csv(rows=30, classes=1), "fewer than 2 classes"),
        (small_csv(rows=9), "too few rows"),
    ],
    ids=["empty", "binary", "ragged", "no-label", "non-numeric", "one-class", "nine-rows"],
)
async def test_bad_csv_is_400_and_leaves_nothing(
    client: Client, alice: Headers, blob_dir: Path, data: bytes, needle: str
) -> None:
    r = await upload(client, alice, data)
    assert r.status_code == 400, r.text
    body = r.json()
    assert needle in body["detail"]
    assert body["status"] == 400 and body["title"] == "Bad Request"
    assert stored_objects(blob_dir) == []


async def test_missing_file_is_400(client: Client, alice: Headers) -> None:
    r = await client.post("/datasets", data={"label_column": "label"}, headers=alice)
    assert r.status_code == 400


async def test_upload_needs_a_token(client: Client, blob_dir: Path) -> None:
    r = await upload(client, {}, small_csv())
    assert r.status_code == 401
    assert stored_objects(blob_dir) == []


async def upload_chunked(client: Client, headers: Headers, data: bytes) -> httpx.Response:
    """A multipart upload without Content-Length, so only the streamed byte count can stop it."""
    boundary = "swarmtrain-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]
        yield tail

    r = await client.post(
        "/datasets",
        content=body(),
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text
    return r


async def test_too_big_is_413(settings: Settings, projector: None, blob_dir: Path) -> None:
    app = create_app(msgspec.structs.replace(settings, max_upload_mb=1))
    async with serving(app) as client:
        alice = await sign_up_and_in(client, "alice@example.com")
        big = small_csv(rows=120_000)
        assert len(big) > 1 << 20
        r = await upload(client, alice, big)
        assert r.status_code == 413, r.text
        assert "1 MiB" in r.json()["detail"]
        assert "1 MiB" in (await upload_chunked(client, alice, big)).json()["detail"]
        assert (await upload(client, alice, small_csv())).status_code == 201
    assert len(stored_objects(blob_dir)) == 1
