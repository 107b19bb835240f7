"""GET/PUT /blobs/{key}: the file:// store's signed, object-scoped URLs, served by the real gateway
(uvicorn on a free port) and used by the peer's ``fetch_url``/``put_url``. No access token is
needed; anything the signature does not grant is a 403 problem, an upload over its cap a 413, and
neither leaves anything in the store."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import httpx
import msgspec
import pytest

from swarmtrain.common import blob, signing
from swarmtrain.common.blob import FileStore
from swarmtrain.common.settings import Settings
from swarmtrain.common.signing import Grant, UrlSigner
from tests.gateway.helpers import live, stored_objects

SECRET = "blob-signing-secret-for-the-gateway-tests"
PROBLEM = "application/problem+json"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, blob_signing_secret=SECRET)


@pytest.fixture
async def gateway_url(settings: Settings) -> AsyncIterator[str]:
    async with live(settings) as base:
        yield base


@pytest.fixture
def signer(settings: Settings, gateway_url: str, blob_dir: Path) -> UrlSigner:
    return UrlSigner(FileStore(blob_dir), msgspec.structs.replace(settings, blob_public_url=gateway_url))


def _url(base: str, grant: Grant, secret: str = SECRET, path_key: str | None = None) -> str:
    query = "&".join(f"{k}={v}" for k, v in signing.signed_query(secret, grant).items())
    return f"{base}/blobs/{quote(grant.key if path_key is None else path_key, safe='/')}?{query}"


async def test_a_peer_writes_and_reads_an_object_through_signed_urls(
    signer: UrlSigner, blob_dir: Path, tmp_path: Path
) -> None:
    data = os.urandom(3 * (1 << 20) + 5)
    local = tmp_path / "weights.safetensors"
    local.write_bytes(data)
    key = "sessions/s1/rounds/0/peer 1.safetensors"

    sent = await asyncio.to_thread(signing.put_url, signer.put_url(key, max_bytes=4 << 20), local)
    got = await asyncio.to_thread(signing.fetch_url, signer.get_url(key), tmp_path / "back" / "w", 4 << 20, sent.sha256)

    assert sent.sha256 == got.sha256 == hashlib.sha256(data).hexdigest()
    assert (blob_dir / key).read_bytes() == data
    assert (tmp_path / "back" / "w").read_bytes() == data
    assert [p.name for p in stored_objects(blob_dir)] == ["peer 1.safetensors"]  # no partial file left


async def test_bytes_in_memory_go_up_and_come_back_on_one_kept_client(signer: UrlSigner, blob_dir: Path) -> None:
    """What a fedavg peer does each round: its update PUT from memory, the others' read into memory,
    on one client whose connections are reused; the sha256 checked when asked, the cap enforced."""
    data = os.urandom(5 * (1 << 20) + 7)
    key = "sessions/s1/rounds/1/p1.safetensors"
    with signing.new_client() as client:
        sent = await asyncio.to_thread(signing.put_url, signer.put_url(key, max_bytes=8 << 20), data, client)
        got = await asyncio.to_thread(signing.fetch_bytes, signer.get_url(key), 8 << 20, sent.sha256, client)
        unchecked = await asyncio.to_thread(signing.fetch_bytes, signer.get_url(key), 8 << 20, None, client)
        with pytest.raises(blob.IntegrityError):
            await asyncio.to_thread(signing.fetch_bytes, signer.get_url(key), 8 << 20, "0" * 64, client)
        with pytest.raises(blob.TooLarge):
            await asyncio.to_thread(signing.fetch_bytes, signer.get_url(key), 1 << 20, None, client)

    assert got == unchecked == data == (blob_dir / key).read_bytes()
    assert (sent.sha256, sent.size) == (hashlib.sha256(data).hexdigest(), len(data))


async def test_what_the_signature_does_not_grant_is_a_403_problem(
    signer: UrlSigner, gateway_url: str, blob_dir: Path
) -> None:
    FileStore(blob_dir).put_bytes("datasets/mine.csv", b"a,b\n1,2\n")
    FileStore(blob_dir).put_bytes("datasets/theirs.csv", b"secret\n")
    future = int(time.time()) + 600
    get = Grant(method="GET", key="datasets/mine.csv", expires_at=future)
    put = Grant(method="PUT", key="datasets/mine.csv", expires_at=future, max_bytes=100)
    good = _url(gateway_url, get)
    refused_gets = [
        good.replace("sig=", "sig=0"),  # tampered signature
        good[:-1] + ("0" if good[-1] != "0" else "1"),
        good.split("&sig=")[0],  # no signature
        f"{gateway_url}/blobs/datasets/mine.csv",  # nothing at all
        _url(gateway_url, Grant(method="GET", key="datasets/mine.csv", expires_at=int(time.time()) - 1)),  # expired
        _url(gateway_url, get, path_key="datasets/theirs.csv"),  # another key
        _url(gateway_url, get, secret=SECRET + "-other"),  # signed by someone else
        good.replace("/datasets/mine.csv", "/datasets/%2e%2e/%2e%2e/etc/passwd"),  # traversal, encoded
        good.replace("/datasets/mine.csv", "/datasets/..%2F..%2Fetc/passwd"),
        good.replace(f"exp={future}", f"exp={future + 3600}"),  # a later expiry
    ]
    async with httpx.AsyncClient(timeout=20) as http:
        assert (await http.get(good)).content == b"a,b\n1,2\n"
        for url in refused_gets:
            r = await http.get(url)
            assert r.status_code == 403, url
            assert r.headers["content-type"].startswith(PROBLEM)
            assert b"secret" not in r.content
        for url in [
            good,  # a GET's signature used for a PUT
            _url(gateway_url, put).replace("max=100", "max=100000"),  # a larger size than granted
            _url(gateway_url, put, path_key="datasets/theirs.csv"),  # another key
        ]:
            r = await http.put(url, content=b"overwritten")
            assert r.status_code == 403, url
            assert r.headers["content-type"].startswith(PROBLEM)
        r = await http.get(_url(gateway_url, put).replace("&max=100", ""))  # a PUT's signature used for a GET
        assert r.status_code == 403
        assert r.json()["status"] == 403

    assert (blob_dir / "datasets" / "mine.csv").read_bytes() == b"a,b\n1,2\n"
    assert (blob_dir / "datasets" / "theirs.csv").read_bytes() == b"secret\n"


async def test_a_put_over_its_cap_is_refused_and_leaves_nothing_behind(signer: UrlSigner, blob_dir: Path) -> None:
    FileStore(blob_dir).put_bytes("models/m.safetensors", b"the old model")
    url = signer.put_url("models/m.safetensors", max_bytes=1000)
    new = signer.put_url("models/new.safetensors", max_bytes=1000)

    async def endless() -> AsyncIterator[bytes]:  # no Content-Length: chunked, found out while streaming
        for _ in range(1000):
            yield bytes(64 * 1024)

    async with httpx.AsyncClient(timeout=20) as http:
        announced = await http.put(url, content=bytes(5000))
        streamed = await http.put(new, content=endless())
        replaced = await http.put(url, content=endless())
        exact = await http.put(new, content=b"x" * 1000)

    for r in (announced, streamed, replaced):
        assert r.status_code == 413, r.text
        assert r.headers["content-type"].startswith(PROBLEM)
    assert exact.status_code == 201
    assert exact.json() == {
        "key": "models/new.safetensors",
        "sha256": hashlib.sha256(b"x" * 1000).hexdigest(),
        "size": 1000,
    }
    assert (blob_dir / "models" / "m.safetensors").read_bytes() == b"the old model"
    assert sorted(p.name for p in stored_objects(blob_dir)) == ["m.safetensors", "new.safetensors"]


async def test_without_a_signing_secret_every_blob_url_is_refused(settings: Settings, blob_dir: Path) -> None:
    FileStore(blob_dir).put_bytes("k", b"x")
    grant = Grant(method="GET", key="k", expires_at=int(time.time()) + 60)
    unsigned = msgspec.structs.replace(settings, blob_signing_secret=None)
    async with live(unsigned) as base, httpx.AsyncClient(timeout=20) as http:
        r = await http.get(_url(base, grant))
    assert r.status_code == 403
