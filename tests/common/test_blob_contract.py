"""One contract for the ``BlobStore`` interface, run against every backend.

``file``: a folder under the test's tmp dir (whose path has a space in it, on purpose).
``s3``: the S3 API of a real HTTP server (moto's server mode) on a free port, one bucket per test.
Each store under test is a *prefix* store (``file:///.../store``, ``s3://bucket/store``) opened
through ``open_store``, as the services open theirs.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import msgspec
import pytest

from swarmtrain.common import blob
from swarmtrain.common.blob import BlobNotFound, BlobStore, FileStore, IntegrityError, S3Store
from swarmtrain.common.settings import Settings

MiB = 1 << 20
_buckets = itertools.count()


class Source:
    """A deterministic byte stream of ``size`` bytes, made on demand, that records every read.

    Its bytes repeat an odd-length random pattern, so parts put together in the wrong order
    would not hash the same. ``fail_after`` makes it raise once that many bytes have been read.
    """

    def __init__(self, size: int, fail_after: int | None = None, seed: bytes = b"") -> None:
        self.size = size
        self.fail_after = fail_after
        self._pattern = hashlib.sha256(seed).digest() * 32771  # 1 MiB + 32 bytes, odd period
        self._pos = 0
        self.reads: list[int] = []

    def read(self, n: int = -1) -> bytes:
        self.reads.append(n)
        if self.fail_after is not None and self._pos >= self.fail_after:
            raise OSError("the client went away")
        end = self.size if n < 0 else min(self.size, self._pos + n)
        out = bytearray()
        while self._pos < end:
            offset = self._pos % len(self._pattern)
            piece = self._pattern[offset : offset + end - self._pos]
            out += piece
            self._pos += len(piece)
        return bytes(out)

    def stream(self) -> BinaryIO:
        return cast(BinaryIO, self)

    @staticmethod
    def digest(size: int, seed: bytes = b"") -> str:
        source, digest = Source(size, seed=seed), hashlib.sha256()
        while chunk := source.read(MiB):
            digest.update(chunk)
        return digest.hexdigest()


@dataclass
class Backend:
    name: str
    url: str
    """The store URL handed to ``open_store``; always a prefix (``.../store``) of ``base``."""
    settings: Settings
    list_base: Callable[[], set[str]]
    """Every object name under the folder or bucket that holds the prefix, relative to it."""

    def open(self) -> BlobStore:
        return blob.open_store(self.url, self.settings)


def _file_backend(tmp_path: Path) -> Backend:
    base = tmp_path / "blob base"
    base.mkdir()

    def list_base() -> set[str]:
        return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}

    url = (base / "store").as_uri()
    return Backend("file", url, Settings(blob_url=url), list_base)


def _s3_backend(settings: Settings) -> Backend:
    bucket = f"contract-{next(_buckets)}"
    root = S3Store(bucket, "", settings)
    root.ensure_bucket()

    def list_base() -> set[str]:
        return {str(o.object_name) for o in root.client.list_objects(bucket, recursive=True)}

    url = f"s3://{bucket}/store"
    return Backend("s3", url, msgspec.structs.replace(settings, blob_url=url), list_base)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return _file_backend(tmp_path)
    return _s3_backend(request.getfixturevalue("s3_settings"))


@pytest.fixture
def store(backend: Backend) -> BlobStore:
    return backend.open()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ the contract


@pytest.mark.parametrize("size", [0, 1, 1000, MiB + 1])
def test_put_bytes_and_get_bytes_round_trip(store: BlobStore, size: int) -> None:
    data = os.urandom(size)

    ref = store.put_bytes("datasets/d1.csv", data)

    assert ref.sha256 == sha256(data)
    assert ref.size == size
    assert ref.uri == store.uri("datasets/d1.csv")
    assert store.get_bytes("datasets/d1.csv") == data
    assert store.get_bytes("datasets/d1.csv", sha256=ref.sha256) == data


def test_get_bytes_with_a_wrong_sha256_raises(store: BlobStore) -> None:
    store.put_bytes("k", b"payload")

    with pytest.raises(IntegrityError):
        store.get_bytes("k", sha256=sha256(b"something else"))


def test_put_overwrites(store: BlobStore) -> None:
    store.put_bytes("k", b"first version, longer")
    ref = store.put_bytes("k", b"second")

    assert store.get_bytes("k") == b"second"
    assert ref.size == 6


def test_put_stream_with_known_length_streams_a_large_object(store: BlobStore) -> None:
    size = 6 * MiB + 7  # over S3's 5 MiB minimum part size
    source = Source(size, seed=b"known")

    ref = store.put_stream("models/m.safetensors", source.stream(), length=size)

    assert (ref.sha256, ref.size) == (Source.digest(size, seed=b"known"), size)
    assert all(0 < n < size for n in source.reads), "the whole object was read at once"
    assert sha256(store.get_bytes("models/m.safetensors")) == ref.sha256


def test_put_stream_with_unknown_length_streams_a_large_object(store: BlobStore) -> None:
    size = 17 * MiB + 3  # more than one 16 MiB part: a multipart upload on S3
    source = Source(size, seed=b"unknown")

    ref = store.put_stream("models/m.bin", source.stream(), length=-1)

    assert (ref.sha256, ref.size) == (Source.digest(size, seed=b"unknown"), size)
    assert all(0 < n < size for n in source.reads), "the whole object was read at once"
    digest, total = hashlib.sha256(), 0
    for chunk in store.iter_chunks("models/m.bin"):
        digest.update(chunk)
        total += len(chunk)
    assert (digest.hexdigest(), total) == (ref.sha256, size)


@pytest.mark.parametrize("length", [6 * MiB, -1])
def test_a_failed_put_leaves_nothing_behind(backend: Backend, store: BlobStore, length: int) -> None:
    source = Source(6 * MiB, fail_after=2 * MiB)

    with pytest.raises(OSError, match="went away"):
        store.put_stream("datasets/half.csv", source.stream(), length=length)

    assert not store.exists("datasets/half.csv")
    assert backend.list_base() == set()


def test_iter_chunks_yields_the_bytes(store: BlobStore) -> None:
    data = os.urandom(2 * MiB + 5)
    store.put_bytes("k", data)

    chunks = list(store.iter_chunks("k"))

    assert all(isinstance(c, bytes) and c for c in chunks)
    assert b"".join(chunks) == data


def test_download_checks_the_sha256(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(MiB + 3)
    ref = store.put_bytes("datasets/d.csv", data)
    target = tmp_path / "downloads" / "d.csv"

    got = store.download("datasets/d.csv", target, sha256=ref.sha256)

    assert target.read_bytes() == data
    assert got == ref


def test_download_with_a_wrong_sha256_raises_and_leaves_no_file(store: BlobStore, tmp_path: Path) -> None:
    store.put_bytes("datasets/d.csv", os.urandom(MiB + 3))
    folder = tmp_path / "downloads"

    with pytest.raises(IntegrityError):
        store.download("datasets/d.csv", folder / "d.csv", sha256=sha256(b"not it"))

    assert list(folder.iterdir()) == []


def test_download_of_a_missing_key_raises_and_leaves_no_file(store: BlobStore, tmp_path: Path) -> None:
    folder = tmp_path / "downloads"

    with pytest.raises(BlobNotFound):
        store.download("nope", folder / "d.csv")

    assert list(folder.iterdir()) == []


def test_exists_and_delete(store: BlobStore) -> None:
    assert not store.exists("a/b")
    store.put_bytes("a/b", b"x")
    assert store.exists("a/b")

    store.delete("a/b")

    assert not store.exists("a/b")
    with pytest.raises(BlobNotFound):
        store.get_bytes("a/b")
    store.delete("a/b")  # deleting what is not there is not an error


@pytest.mark.parametrize("key", ["nope", "deep/er/nope", "dir", "dir/obj/below"])
def test_a_missing_key_raises_blob_not_found(store: BlobStore, key: str) -> None:
    store.put_bytes("dir/obj", b"x")  # "dir" is a folder of a FileStore, not an object

    assert not store.exists(key)
    with pytest.raises(BlobNotFound):
        list(store.iter_chunks(key))
    with pytest.raises(BlobNotFound):
        store.get_bytes(key)
    store.delete(key)
    assert store.get_bytes("dir/obj") == b"x"


@pytest.mark.parametrize("key", ["plain.bin", "models/s1/peer 1 (best).safetensors"])
def test_uri_resolves_to_the_same_object(backend: Backend, store: BlobStore, key: str) -> None:
    data = os.urandom(1000)
    ref = store.put_bytes(key, data)

    other, other_key = blob.resolve(ref.uri, backend.settings)

    assert other.uri(other_key) == ref.uri
    assert other.get_bytes(other_key, sha256=ref.sha256) == data
    other.delete(other_key)
    assert not store.exists(key)


def test_a_prefix_store_keeps_its_keys_under_its_prefix(backend: Backend, store: BlobStore) -> None:
    store.put_bytes("datasets/d.csv", b"a")
    store.put_bytes("top.bin", b"b")

    assert backend.list_base() == {"store/datasets/d.csv", "store/top.bin"}
    assert store.uri("top.bin").startswith(backend.url.rstrip("/") + "/")


# ------------------------------------------------------------------ backend-specific edges


def test_an_unknown_length_s3_upload_is_multipart(s3_settings: Settings) -> None:
    backend = _s3_backend(s3_settings)
    store = backend.open()
    assert isinstance(store, S3Store)

    store.put_stream("big", Source(17 * MiB).stream(), length=-1)

    etag = store.client.stat_object(store.bucket, "store/big").etag
    assert etag is not None and etag.endswith("-2")  # an S3 multipart ETag names its part count


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a/../.."])
def test_a_file_store_refuses_keys_that_escape_its_root(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    store = FileStore(root)

    for action in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.uri(key),
    ):
        with pytest.raises(ValueError, match="escapes"):
            action()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "url", ["ftp://host/dir", "file://relative/dir", "http://127.0.0.1:9000/bucket", "bucket/prefix", ""]
)
def test_open_store_and_resolve_reject_unknown_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        blob.open_store(url)
    with pytest.raises(ValueError, match="unsupported"):
        blob.resolve(url)


# ------------------------------------------------------------------ confinement and caps (issue 10)

ESCAPING_KEYS = [
    "../x",
    "a/../../x",
    "a/../b",
    "/etc/passwd",
    "a/../..",
    "./x",
    "a//b",
    "a/",
    "",
    "..",
    "a\x00b",
    "x\n",
    "%2e%2e/x",
    "a/%2E%2E/%2e%2e/x",
    "..\\x",
    "k" * 1025,
]


@pytest.mark.parametrize("key", ESCAPING_KEYS)
def test_every_store_refuses_keys_that_are_not_plain_relative_paths(
    backend: Backend, store: BlobStore, key: str
) -> None:
    for action in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.uri(key),
    ):
        with pytest.raises(blob.OutsideStore, match="escapes"):
            action()
    assert backend.list_base() == set()


def _outside_uris(backend: Backend) -> list[str]:
    """URIs a hostile peer could hand over as a model, update or dataset URI."""
    base = backend.url.rstrip("/")
    bucket = base.removeprefix("s3://").split("/")[0]
    return [
        "file:///proc/self/environ",
        "file:///etc/passwd",
        "file://localhost/proc/self/environ",
        f"{base}/../secret",
        f"{base}/a/../../secret",
        f"{base}/%2e%2e/secret",
        f"{base}/a/%2E%2E/%2e%2e/secret",
        f"{base}/a%00b",
        f"{base}/a%2F..%2F..%2Fsecret",
        f"{base}/./x",
        f"{base}" + "-sibling/x",
        f"{base}",
        f"{base}/",
        "s3://another-bucket/store/x",
        f"s3://{bucket}/x",
        f"s3://{bucket}/other/x",
        f"s3://{bucket}/store/../x",
        f"s3://{bucket}/store/%2e%2e/x",
        f"{base}/x#frag",
        f"{base}/x?q=1",
    ]


def test_resolve_never_maps_a_uri_outside_the_configured_store(backend: Backend, store: BlobStore) -> None:
    """``file:///proc/self/environ`` would hand out the gateway's environment, its JWT secret in it."""
    store.put_bytes("x", b"inside")
    refused = []
    for uri in _outside_uris(backend):
        try:
            blob.resolve(uri, backend.settings)
        except ValueError as exc:  # OutsideStore, or "unsupported" for a URI no store could hold
            refused.append(uri)
            if uri.startswith(("file:///proc", "file:///etc", f"{backend.url}/..")):
                assert isinstance(exc, blob.OutsideStore), uri
    assert refused == _outside_uris(backend)


def test_resolve_maps_the_stores_own_uris_to_keys(backend: Backend, store: BlobStore) -> None:
    ref = store.put_bytes("sessions/s1/rounds/0/p1.safetensors", b"w")

    other, key = blob.resolve(ref.uri, backend.settings)

    assert key == "sessions/s1/rounds/0/p1.safetensors"
    assert store.key_of(ref.uri) == key
    assert other.get_bytes(key) == b"w"


def test_a_read_stops_at_the_cap_and_leaves_no_file(backend: Backend, store: BlobStore, tmp_path: Path) -> None:
    store.put_stream("big", Source(3 * MiB).stream(), length=3 * MiB)
    folder = tmp_path / "downloads"

    with pytest.raises(blob.TooLarge):
        store.download("big", folder / "big", max_bytes=MiB)
    with pytest.raises(blob.TooLarge):
        store.get_bytes("big", max_bytes=MiB)
    with pytest.raises(blob.TooLarge):
        list(store.iter_chunks("big", max_bytes=MiB))

    assert list(folder.iterdir()) == []
    assert len(store.get_bytes("big", max_bytes=3 * MiB)) == 3 * MiB


def test_the_default_cap_is_the_setting(backend: Backend, tmp_path: Path) -> None:
    settings = msgspec.structs.replace(backend.settings, blob_max_download_mb=1)
    store = blob.open_store(backend.url, settings)
    store.put_stream("big", Source(MiB + 1).stream(), length=MiB + 1)

    with pytest.raises(blob.TooLarge):
        store.download("big", tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_verify_checks_the_sha256_before_anything_is_served(store: BlobStore) -> None:
    ref = store.put_bytes("models/m.safetensors", b"weights")

    assert store.verify("models/m.safetensors", ref.sha256) == ref
    assert store.verify("models/m.safetensors", ref.sha256.upper()) == ref
    with pytest.raises(IntegrityError):
        store.verify("models/m.safetensors", sha256(b"other weights"))
    with pytest.raises(blob.TooLarge):
        store.verify("models/m.safetensors", ref.sha256, max_bytes=3)
    with pytest.raises(BlobNotFound):
        store.verify("models/none.safetensors", ref.sha256)


def test_a_symlink_out_of_a_file_store_is_refused(tmp_path: Path) -> None:
    backend = _file_backend(tmp_path)
    store = backend.open()
    assert isinstance(store, FileStore)
    store.put_bytes("datasets/real.csv", b"a,b\n")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"JWT_SECRET=...")
    links = store.root / "datasets"
    (links / "secret.csv").symlink_to(secret)
    (links / "zero.csv").symlink_to("/dev/zero")
    (store.root / "escape").symlink_to(tmp_path)

    for key in ("datasets/secret.csv", "datasets/zero.csv", "escape/secret.txt"):
        with pytest.raises(blob.OutsideStore):
            store.get_bytes(key)
        with pytest.raises(blob.OutsideStore):
            blob.resolve(f"{backend.url}/{key}", backend.settings)
        with pytest.raises(blob.OutsideStore):
            store.put_bytes(key, b"overwrite")
    assert secret.read_bytes() == b"JWT_SECRET=..."


def test_a_fifo_in_a_file_store_is_refused_without_hanging(tmp_path: Path) -> None:
    """A /dev/zero-like endless source planted in the store is not read."""
    store = _file_backend(tmp_path).open()
    assert isinstance(store, FileStore)
    store.put_bytes("datasets/real.csv", b"a,b\n")
    os.mkfifo(store.root / "datasets" / "fifo.csv")

    with pytest.raises(blob.OutsideStore):
        store.get_bytes("datasets/fifo.csv")
