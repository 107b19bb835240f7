"""Object-scoped, expiring URLs: the HMAC grants of the gateway's /blobs routes, S3 presigned URLs
against a real S3 HTTP server (moto), and the peer's capped, streaming ``fetch_url``/``put_url``."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmtrain.common import blob, signing
from swarmtrain.common.blob import FileStore, S3Store
from swarmtrain.common.settings import Settings
from swarmtrain.common.signing import Forbidden, Grant, UrlSigner

SECRET = "blob-signing-secret-0123456789abcdef"
MiB = 1 << 20
_buckets = itertools.count()


def _query(grant: Grant, secret: str = SECRET) -> dict[str, str]:
    return signing.signed_query(secret, grant)


def _verify(grant: Grant, query: dict[str, str], now: float | None = None, key: str | None = None) -> Grant:
    return signing.verify(
        SECRET,
        grant.method,
        grant.key if key is None else key,
        query.get("exp"),
        query.get("sig"),
        query.get("max"),
        now=now,
    )


# ------------------------------------------------------------------ HMAC grants


def test_a_signed_grant_verifies() -> None:
    future = int(time.time()) + 60
    for grant in (
        Grant(method="GET", key="datasets/d.csv", expires_at=future),
        Grant(method="PUT", key="sessions/s/rounds/0/p.safetensors", expires_at=future, max_bytes=1000),
    ):
        assert _verify(grant, _query(grant)) == grant


def test_a_grant_is_refused_once_expired() -> None:
    grant = Grant(method="GET", key="k", expires_at=1_000)

    assert _verify(grant, _query(grant), now=1_000) == grant
    with pytest.raises(Forbidden, match="expired"):
        _verify(grant, _query(grant), now=1_001)


def test_a_grant_does_not_stretch_to_another_method_key_expiry_or_size() -> None:
    future = int(time.time()) + 60
    put = Grant(method="PUT", key="models/a.safetensors", expires_at=future, max_bytes=1000)
    query = _query(put)

    with pytest.raises(Forbidden):  # another key
        _verify(put, query, key="models/b.safetensors")
    with pytest.raises(Forbidden):  # the PUT's signature used for a GET
        signing.verify(SECRET, "GET", put.key, query["exp"], query["sig"])
    with pytest.raises(Forbidden):  # a larger size
        _verify(put, {**query, "max": "1000000"})
    with pytest.raises(Forbidden):  # a later expiry
        _verify(put, {**query, "exp": str(future + 3600)})
    with pytest.raises(Forbidden):  # a PUT without its size
        _verify(put, {k: v for k, v in query.items() if k != "max"})
    with pytest.raises(Forbidden):  # another method altogether
        signing.verify(SECRET, "DELETE", put.key, query["exp"], query["sig"], query["max"])
    with pytest.raises(Forbidden):  # another secret
        signing.verify(SECRET + "x", "PUT", put.key, query["exp"], query["sig"], query["max"])
    for sig in ("", "0" * 64, query["sig"].upper(), query["sig"][:-1], query["sig"] + "0", "é" * 64):
        with pytest.raises(Forbidden):
            _verify(put, {**query, "sig": sig})
    for exp in ("", "-1", "1e9", " 1", "١٢٣", "9" * 30):
        with pytest.raises(Forbidden):
            _verify(put, {**query, "exp": exp})


@given(
    key=st.sampled_from(["a", "datasets/d.csv", "models/s1/peer 1 (best).safetensors"]),
    flip=st.integers(min_value=0, max_value=63),
)
def test_any_changed_signature_character_is_refused(key: str, flip: int) -> None:
    grant = Grant(method="GET", key=key, expires_at=int(time.time()) + 60)
    query = _query(grant)
    sig = query["sig"]
    tampered = sig[:flip] + ("0" if sig[flip] != "0" else "1") + sig[flip + 1 :]

    with pytest.raises(Forbidden, match="signature"):
        _verify(grant, {**query, "sig": tampered})


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../x", "%2e%2e/x", "a\x00b"])
def test_no_grant_is_made_or_honoured_for_a_key_outside_the_store(key: str) -> None:
    grant = Grant(method="GET", key=key, expires_at=int(time.time()) + 60)

    with pytest.raises(blob.OutsideStore):
        signing.signature(SECRET, grant)
    with pytest.raises(Forbidden):
        signing.verify(SECRET, "GET", key, str(grant.expires_at), "0" * 64)


@pytest.mark.parametrize("secret", [None, "", "short"])
def test_without_a_long_enough_secret_nothing_is_signed_or_accepted(secret: str | None) -> None:
    grant = Grant(method="GET", key="k", expires_at=int(time.time()) + 60)

    with pytest.raises(ValueError, match="SWARMTRAIN_BLOB_SIGNING_SECRET"):
        signing.signature(secret, grant)
    with pytest.raises(Forbidden):
        signing.verify(secret, "GET", "k", str(grant.expires_at), _query(grant)["sig"])
    with pytest.raises(ValueError, match="SWARMTRAIN_BLOB_SIGNING_SECRET"):
        UrlSigner(FileStore(Path("/nonexistent")), Settings(blob_signing_secret=secret))


def test_a_file_store_url_names_the_gateway_route_and_verifies(tmp_path: Path) -> None:
    settings = Settings(blob_signing_secret=SECRET, blob_public_url="https://gw.example:8443/", blob_url_ttl_s=600)
    signer = UrlSigner(FileStore(tmp_path), settings)
    before = int(time.time())

    url = urlsplit(signer.put_url("models/s1/peer 1.safetensors", max_bytes=4096))

    assert (url.scheme, url.netloc, url.path) == ("https", "gw.example:8443", "/blobs/models/s1/peer%201.safetensors")
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert set(query) == {"exp", "max", "sig"}
    assert before + 600 <= int(query["exp"]) <= int(time.time()) + 600
    grant = signing.verify(SECRET, "PUT", "models/s1/peer 1.safetensors", query["exp"], query["sig"], query["max"])
    assert grant.max_bytes == 4096
    get = urlsplit(signer.get_url("datasets/d.csv", ttl_s=5))
    assert set(parse_qs(get.query)) == {"exp", "sig"}
    with pytest.raises(blob.OutsideStore):
        signer.get_url("../etc/passwd")


# ------------------------------------------------------------------ the peer's side, over real HTTP


class _Source(BaseHTTPRequestHandler):
    """``/zero``: /dev/zero over HTTP (no length, never ends); ``/liar``: announces 10 GiB;
    ``/small``: 1000 bytes."""

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.send_response(200)
        if path == "/zero":
            self.end_headers()
            try:
                while True:
                    self.wfile.write(bytes(64 * 1024))
            except OSError:  # the client hung up: what a capped download does
                return
        body = b"x" * 1000
        self.send_header("Content-Length", str(10 << 30) if path == "/liar" else str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def source() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Source)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_an_endless_download_stops_at_the_cap_and_leaves_nothing(source: str, tmp_path: Path) -> None:
    folder = tmp_path / "cache"

    with pytest.raises(blob.TooLarge):
        signing.fetch_url(f"{source}/zero?sig=secret", folder / "d.csv", max_bytes=MiB)
    with pytest.raises(blob.TooLarge, match="10737418240 bytes"):
        signing.fetch_url(f"{source}/liar", folder / "d.csv", max_bytes=MiB)

    assert list(folder.iterdir()) == []


def test_fetch_url_checks_the_sha256_and_leaves_nothing_on_a_mismatch(source: str, tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "d.csv"

    with pytest.raises(blob.IntegrityError):
        signing.fetch_url(f"{source}/small", dest, max_bytes=MiB, sha256=hashlib.sha256(b"other").hexdigest())
    assert list(dest.parent.iterdir()) == []

    ref = signing.fetch_url(
        f"{source}/small?sig=s", dest, max_bytes=MiB, sha256=hashlib.sha256(b"x" * 1000).hexdigest()
    )
    assert dest.read_bytes() == b"x" * 1000
    assert (ref.uri, ref.size) == (f"{source}/small", 1000)  # the query (the credential) is not kept


@pytest.mark.parametrize("url", ["file:///etc/passwd", "s3://bucket/key", "ftp://host/x"])
def test_fetch_and_put_take_only_http_urls(url: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="not an http"):
        signing.fetch_url(url, tmp_path / "d", max_bytes=MiB)
    with pytest.raises(ValueError, match="not an http"):
        signing.put_url(url, tmp_path / "f")


# ------------------------------------------------------------------ S3 presigned URLs (moto)


@pytest.fixture
def s3_store(s3_settings: Settings) -> S3Store:
    bucket = f"signing-{next(_buckets)}"
    settings = msgspec.structs.replace(s3_settings, blob_url=f"s3://{bucket}/store")
    store = blob.open_store(settings.blob_url, settings)
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    return store


def test_s3_presigned_urls_write_and_read_one_object(s3_store: S3Store, tmp_path: Path) -> None:
    signer = UrlSigner(s3_store, Settings(blob_url_ttl_s=600))  # no signing secret needed for S3
    data = os.urandom(2 * MiB + 3)
    (tmp_path / "w.safetensors").write_bytes(data)

    put = signer.put_url("sessions/s1/rounds/0/p1.safetensors", max_bytes=4 * MiB)
    sent = signing.put_url(put, tmp_path / "w.safetensors")
    got = signing.fetch_url(
        signer.get_url("sessions/s1/rounds/0/p1.safetensors"),
        tmp_path / "back" / "w.safetensors",
        max_bytes=4 * MiB,
        sha256=sent.sha256,
    )

    assert (got.sha256, got.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert s3_store.verify("sessions/s1/rounds/0/p1.safetensors", sent.sha256).size == len(data)
    assert urlsplit(put).path == f"/{s3_store.bucket}/store/sessions/s1/rounds/0/p1.safetensors"
    assert "X-Amz-Signature" in urlsplit(put).query
    assert "X-Amz-Expires=600" in urlsplit(put).query


def test_s3_presigned_get_of_a_missing_object_is_an_http_error(s3_store: S3Store, tmp_path: Path) -> None:
    url = UrlSigner(s3_store, Settings()).get_url("nope")

    with pytest.raises(httpx.HTTPStatusError):
        signing.fetch_url(url, tmp_path / "d" / "x", max_bytes=MiB)
    assert list((tmp_path / "d").iterdir()) == []


def test_s3_presigned_urls_last_at_most_seven_days(s3_store: S3Store) -> None:
    url = UrlSigner(s3_store, Settings(blob_url_ttl_s=30 * 24 * 3600)).get_url("k")

    assert f"X-Amz-Expires={7 * 24 * 3600}" in urlsplit(url).query
    with pytest.raises(blob.OutsideStore):
        UrlSigner(s3_store, Settings()).put_url("../other-prefix/k", max_bytes=1)


def test_a_signed_urls_expiry_is_read_from_either_kind_of_url() -> None:
    assert signing.url_expiry("http://gw/blobs/k?exp=1700000000&sig=ab") == 1700000000.0
    presigned = "http://minio/b/k?X-Amz-Date=20260101T000000Z&X-Amz-Expires=600&X-Amz-Signature=x"
    assert signing.url_expiry(presigned) == 1767225600.0 + 600
    assert signing.url_expiry("http://gw/blobs/k") is None
    assert signing.url_expiry("http://gw/blobs/k?exp=soon") is None
