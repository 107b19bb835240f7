"""Object-scoped, expiring URLs: what a peer may read or write, without any storage credential.

A ``Grant`` says one method (``GET`` or ``PUT``), one key, an expiry (Unix seconds) and, for a PUT,
the most bytes it may write. ``UrlSigner`` turns a grant into a URL the holder can use as is:

- for an ``s3://`` store, a presigned URL from the minio client (S3 checks it; S3 cannot bound a
  presigned PUT's size, so the service checks the object's size and sha256 before trusting it);
- for a ``file://`` store, a URL of the gateway's ``/blobs/{key}`` routes with ``exp``, ``max`` (PUT
  only) and ``sig``: HMAC-SHA256 of the grant under ``Settings.blob_signing_secret``, which the
  signer (the scheduler) and the gateway share. ``verify`` checks it in constant time.

``fetch_url``, ``fetch_bytes`` and ``put_url`` are the peer's side: streaming httpx, a size cap on
every download, an optional sha256 check, an atomic local write (or the bytes in memory).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import msgspec

from swarmtrain.common.blob import BlobRef, BlobStore, FileStore, IntegrityError, S3Store, TooLarge, normalise_key
from swarmtrain.common.settings import Settings, get_settings

Method = Literal["GET", "PUT"]
METHODS: tuple[Method, ...] = ("GET", "PUT")
ROUTE = "/blobs"
"""The gateway's path prefix of signed ``file://`` objects."""
MIN_SECRET_CHARS = 32
MAX_S3_TTL_S = 7 * 24 * 3600
"""S3 signature v4 presigned URLs live at most seven days."""
_DOMAIN = b"swarmtrain-blob-url-v1"
CHUNK = 1 << 16
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class Forbidden(Exception):
    """A signed URL that does not grant this request: bad or missing signature, expired, another
    method or key, an unusable ``max``. The message says which, for the log; clients get a 403."""


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    method: Method
    key: str
    expires_at: int
    """Unix seconds after which the URL is refused."""
    max_bytes: int | None = None
    """PUT only: the most bytes the upload may hold."""


def _secret(secret: str | None) -> bytes:
    if not secret or len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"SWARMTRAIN_BLOB_SIGNING_SECRET must be set to at least {MIN_SECRET_CHARS} characters "
            "(for example: export SWARMTRAIN_BLOB_SIGNING_SECRET=$(openssl rand -hex 32))"
        )
    return secret.encode()


def signature(secret: str | None, grant: Grant) -> str:
    """Hex HMAC-SHA256 of the grant: every field, in a fixed order, newline-separated (a key
    cannot hold a newline, so no two grants share a message)."""
    normalise_key(grant.key)
    message = b"\n".join(
        (
            _DOMAIN,
            grant.method.encode(),
            grant.key.encode(),
            str(grant.expires_at).encode(),
            b"" if grant.max_bytes is None else str(grant.max_bytes).encode(),
        )
    )
    return hmac.new(_secret(secret), message, hashlib.sha256).hexdigest()


def signed_query(secret: str | None, grant: Grant) -> dict[str, str]:
    """The query parameters of a gateway URL for ``grant``: ``exp``, ``max`` (PUT) and ``sig``."""
    query = {"exp": str(grant.expires_at)}
    if grant.max_bytes is not None:
        query["max"] = str(grant.max_bytes)
    query["sig"] = signature(secret, grant)
    return query


def url_expiry(url: str) -> float | None:
    """When a signed URL stops granting (UTC seconds): a gateway URL's ``exp``, a presigned S3
    URL's ``X-Amz-Date`` + ``X-Amz-Expires``; None when it says nothing of it."""
    query = dict(parse_qsl(urlsplit(url).query))
    try:
        if "exp" in query:
            return float(int(query["exp"]))
        if "X-Amz-Date" in query and "X-Amz-Expires" in query:
            signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            return signed.timestamp() + int(query["X-Amz-Expires"])
    except ValueError:
        return None
    return None


def _integer(name: str, value: str | None) -> int:
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 19:
        raise Forbidden(f"{name} is missing or not a non-negative integer")
    return int(value)


def verify(
    secret: str | None,
    method: str,
    key: str,
    exp: str | None,
    sig: str | None,
    max_bytes: str | None = None,
    now: float | None = None,
) -> Grant:
    """The grant a gateway URL carries, if ``sig`` signs exactly it and it has not expired;
    ``Forbidden`` otherwise. The signature is compared in constant time."""
    if method not in METHODS:
        raise Forbidden(f"method {method} is never granted")
    if not sig:
        raise Forbidden("no signature")
    grant = Grant(
        method=method,  # type: ignore[arg-type]  # checked above
        key=key,
        expires_at=_integer("exp", exp),
        max_bytes=None if max_bytes is None else _integer("max", max_bytes),
    )
    if (grant.method == "PUT") != (grant.max_bytes is not None):
        raise Forbidden("max is required on a PUT and only there")
    try:
        expected = signature(secret, grant)
    except ValueError as exc:  # a key outside the store, or no secret configured
        raise Forbidden(str(exc)) from None
    if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
        raise Forbidden("the signature does not match this method, key, expiry and size")
    if (time.time() if now is None else now) > grant.expires_at:
        raise Forbidden("the URL has expired")
    return grant


class UrlSigner:
    """Object-scoped, expiring URLs into one store: presigned by S3 for an ``S3Store``, signed for
    the gateway's ``/blobs`` routes for a ``FileStore``."""

    def __init__(self, store: BlobStore, settings: Settings | None = None) -> None:
        self.store = store
        self.settings = settings or get_settings()
        if isinstance(store, FileStore):
            _secret(self.settings.blob_signing_secret)  # fail at start, not at the first URL

    def _expiry(self, ttl_s: float | None) -> int:
        ttl = self.settings.blob_url_ttl_s if ttl_s is None else ttl_s
        if isinstance(self.store, S3Store):
            ttl = min(ttl, MAX_S3_TTL_S)
        return int(time.time() + max(1.0, ttl))

    def base_url(self) -> str:
        s = self.settings
        return (s.blob_public_url or f"http://{s.host}:{s.port}").rstrip("/")

    def url(self, grant: Grant) -> str:
        normalise_key(grant.key)
        if isinstance(self.store, S3Store):
            expires = timedelta(seconds=max(1, grant.expires_at - int(time.time())))
            name = self.store.object_name(grant.key)
            if grant.method == "GET":
                return self.store.client.presigned_get_object(self.store.bucket, name, expires=expires)
            return self.store.client.presigned_put_object(self.store.bucket, name, expires=expires)
        path = f"{ROUTE}/{quote(grant.key, safe='/')}"
        query = urlencode(signed_query(self.settings.blob_signing_secret, grant))
        return f"{self.base_url()}{path}?{query}"

    def get_url(self, key: str, ttl_s: float | None = None) -> str:
        """A URL that reads ``key`` until it expires (``ttl_s``, default ``blob_url_ttl_s``)."""
        return self.url(Grant(method="GET", key=key, expires_at=self._expiry(ttl_s)))

    def put_url(self, key: str, max_bytes: int, ttl_s: float | None = None) -> str:
        """A URL that writes ``key`` (at most ``max_bytes``; on S3 the service must check the size
        afterwards, see ``BlobStore.verify``) until it expires."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        return self.url(Grant(method="PUT", key=key, expires_at=self._expiry(ttl_s), max_bytes=max_bytes))


# ------------------------------------------------------------------ the peer's side


def _without_query(url: str) -> str:
    """``url`` with no query: what may be logged or reported (the query is the credential)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _check_http(url: str) -> None:
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {_without_query(url)[:200]!r}")


def _get_capped(
    http: httpx.Client, url: str, max_bytes: int, sink: Callable[[bytes], object], hashed: bool = True
) -> BlobRef:
    """GET ``url``, each chunk to ``sink``: ``TooLarge`` as soon as the announced length or the
    bytes received pass ``max_bytes`` (an endless body is cut there). Its size and (``hashed``)
    sha256, else an empty one."""
    digest, size = (hashlib.sha256() if hashed else None), 0
    with http.stream("GET", url) as response:
        response.raise_for_status()
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) > max_bytes:
            raise TooLarge(f"{_without_query(url)}: {announced} bytes, over the {max_bytes}-byte cap")
        for chunk in response.iter_bytes(CHUNK):  # decoded: the cap bounds what is kept
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(f"{_without_query(url)}: more than the {max_bytes}-byte cap")
            if digest is not None:
                digest.update(chunk)
            sink(chunk)
    return BlobRef(uri=_without_query(url), sha256=digest.hexdigest() if digest else "", size=size)


def _check_sha256(ref: BlobRef, sha256: str | None) -> None:
    if sha256 is not None and ref.sha256 != sha256.lower():
        raise IntegrityError(f"{ref.uri}: sha256 mismatch")


def fetch_url(
    url: str, dest: Path, max_bytes: int, sha256: str | None = None, client: httpx.Client | None = None
) -> BlobRef:
    """Download ``url`` to ``dest`` atomically, streaming: ``TooLarge`` as soon as the announced
    length or the bytes received pass ``max_bytes`` (an endless body is cut there),
    ``IntegrityError`` if ``sha256`` is given and differs; either way no file is left. HTTP errors
    raise ``httpx.HTTPStatusError``. The returned ``uri`` is the URL without its query."""
    _check_http(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, _client(client) as http:
            ref = _get_capped(http, url, max_bytes, out.write)
        _check_sha256(ref, sha256)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ref


def fetch_bytes(url: str, max_bytes: int, sha256: str | None = None, client: httpx.Client | None = None) -> bytes:
    """``url``'s body in memory, as :func:`fetch_url` checks it (cap while streaming, sha256 if
    given): for objects a peer uses at once, such as a round's updates."""
    _check_http(url)
    body = bytearray()
    with _client(client) as http:
        ref = _get_capped(http, url, max_bytes, body.extend, hashed=sha256 is not None)
    _check_sha256(ref, sha256)
    return bytes(body)


def put_url(url: str, source: Path | bytes, client: httpx.Client | None = None) -> BlobRef:
    """Upload ``source`` (a file, streamed, or bytes in memory) to ``url`` with a PUT and its
    Content-Length (S3 refuses chunked uploads). Returns its sha256 and size as sent; the gateway's
    answer, when it names a sha256, must agree (``IntegrityError`` otherwise)."""
    _check_http(url)
    digest = hashlib.sha256()
    content: bytes | Iterator[bytes]
    if isinstance(source, bytes):
        size = len(source)
        digest.update(source)
        content = source
    else:
        size = source.stat().st_size

        def body() -> Iterator[bytes]:
            with source.open("rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    yield chunk

        content = body()

    with _client(client) as http:
        response = http.put(url, content=content, headers={"Content-Length": str(size)})
        response.raise_for_status()
    ref = BlobRef(uri=_without_query(url), sha256=digest.hexdigest(), size=size)
    if response.headers.get("content-type", "").startswith("application/json"):
        stored = msgspec.json.decode(response.content)
        if isinstance(stored, dict) and stored.get("sha256") not in (None, ref.sha256):
            raise IntegrityError(f"{ref.uri}: the server stored other bytes than were sent")
    return ref


class _Borrowed:
    """A caller's client, used without closing it."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def __enter__(self) -> httpx.Client:
        return self.client

    def __exit__(self, *exc: object) -> None:
        return None


def new_client() -> httpx.Client:
    """A client for signed URLs (no redirects followed): one kept for many transfers reuses its
    connections."""
    return httpx.Client(timeout=TIMEOUT, follow_redirects=False)


def _client(client: httpx.Client | None) -> httpx.Client | _Borrowed:
    return _Borrowed(client) if client is not None else new_client()
