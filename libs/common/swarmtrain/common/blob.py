"""One small blob-store interface, two backends: a local folder (file://) and S3/MinIO (s3://).

Blocking by design (minio is a blocking client); async callers run it in a worker thread.
Every put returns the object's sha256 and size, computed while the bytes stream through.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import msgspec

from swarmtrain.common.settings import Settings, get_settings

CHUNK = 1 << 20


class BlobRef(msgspec.Struct, frozen=True, kw_only=True):
    uri: str
    sha256: str
    size: int


class BlobNotFound(KeyError):
    pass


class IntegrityError(ValueError):
    """The bytes read do not hash to the sha256 that was promised."""


class _HashingReader:
    """Wraps a stream; hashes and counts what is read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


class BlobStore(ABC):
    """Keys are relative, '/'-separated paths such as ``datasets/<id>.csv``."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, length: int = -1) -> BlobRef: ...

    @abstractmethod
    def iter_chunks(self, key: str) -> Iterator[bytes]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> BlobRef:
        import io

        return self.put_stream(key, io.BytesIO(data), len(data))

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        data = b"".join(self.iter_chunks(key))
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{self.uri(key)}: sha256 mismatch")
        return data

    def download(self, key: str, path: Path, sha256: str | None = None) -> BlobRef:
        """Copy the object to ``path`` (atomically), checking ``sha256`` when given."""
        digest = hashlib.sha256()
        size = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.iter_chunks(key):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise IntegrityError(f"{self.uri(key)}: sha256 mismatch")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return BlobRef(uri=self.uri(key), sha256=digest.hexdigest(), size=size)


class FileStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in (path, *path.parents):
            raise ValueError(f"key escapes the store: {key!r}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_stream(self, key: str, stream: BinaryIO, length: int = -1) -> BlobRef:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        reader = _HashingReader(stream)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return BlobRef(uri=self.uri(key), sha256=reader.hash.hexdigest(), size=reader.size)

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # A folder is not an object: "a" when "a/b" exists is missing, as it is on S3.
            raise BlobNotFound(self.uri(key)) from None
        with f:
            while chunk := f.read(CHUNK):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)


class S3Store(BlobStore):
    def __init__(self, bucket: str, prefix: str = "", settings: Settings | None = None) -> None:
        from minio import Minio

        s = settings or get_settings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = Minio(
            s.s3_endpoint,
            access_key=s.s3_access_key,
            secret_key=s.s3_secret_key,
            secure=s.s3_secure,
            region=s.s3_region,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def put_stream(self, key: str, stream: BinaryIO, length: int = -1) -> BlobRef:
        reader = _HashingReader(stream)
        part_size = 0 if length >= 0 else 16 * CHUNK
        self.client.put_object(self.bucket, self._key(key), reader, length=length, part_size=part_size)  # type: ignore[arg-type]
        return BlobRef(uri=self.uri(key), sha256=reader.hash.hexdigest(), size=reader.size)

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                raise BlobNotFound(self.uri(key)) from None
            raise
        try:
            yield from resp.stream(CHUNK)
        finally:
            resp.close()
            resp.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self._key(key))


def _file_path(url: str) -> Path:
    """The local path of a ``file:`` URL, percent-decoded as ``Path.as_uri()`` encodes it."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"unsupported file URL {url!r}: use file:///absolute/path")
    return Path(unquote(parsed.path))


def open_store(url: str, settings: Settings | None = None) -> BlobStore:
    """``file:///abs/dir`` or ``s3://bucket[/prefix]``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(_file_path(url))
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, settings)
    raise ValueError(f"unsupported blob store URL {url!r}: use file:///path or s3://bucket")


def resolve(uri: str, settings: Settings | None = None) -> tuple[BlobStore, str]:
    """Split an object URI into the store that holds it and its key."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return FileStore(Path("/")), str(_file_path(uri)).lstrip("/")
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, "", settings), parsed.path.lstrip("/")
    raise ValueError(f"unsupported blob URI {uri!r}")
