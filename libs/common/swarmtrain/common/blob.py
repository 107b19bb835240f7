"""One small blob-store interface, two backends: a local folder (file://) and S3/MinIO (s3://).

Blocking by design (minio is a blocking client); async callers run it in a worker thread.
Every put returns the object's sha256 and size, computed while the bytes stream through.

Confinement: a key is a relative, '/'-separated path such as ``datasets/<id>.csv``, checked by
``normalise_key`` (no ``.``/``..``/empty segments, no leading '/', no NUL or other control
character, no backslash, no '%'), and a ``FileStore`` also refuses a path that symlinks out of its
root or is not a regular file. ``resolve`` maps an object URI only into the configured store
(``Settings.blob_url``): a ``file://`` URI outside its folder or an ``s3://`` URI of another bucket or
prefix is ``OutsideStore``, never a read of ``/proc/self/environ``. Every read has a size cap
(``max_bytes``, by default ``Settings.blob_max_download_mb``), so an endless source ends in
``TooLarge`` with nothing left on disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import msgspec

from swarmtrain.common.settings import Settings, get_settings

CHUNK = 1 << 20
MiB = 1 << 20
DEFAULT_MAX_BYTES = 1024 * MiB
"""The read cap of a store opened without settings (``Settings.blob_max_download_mb`` otherwise)."""
MAX_KEY_CHARS = 1024
"""S3's longest object name, in bytes; the same bound for every store."""


class BlobRef(msgspec.Struct, frozen=True, kw_only=True):
    uri: str
    sha256: str
    size: int


class BlobNotFound(KeyError):
    pass


class IntegrityError(ValueError):
    """The bytes read do not hash to the sha256 that was promised."""


class OutsideStore(ValueError):
    """A key or URI that does not name an object inside the store (traversal, absolute path,
    other bucket, symlink out, control characters): refused before any I/O on it."""


class TooLarge(ValueError):
    """An object (or a download) is larger than the cap it was read under."""


def normalise_key(key: str) -> str:
    """``key`` if it is a plain relative object key, else ``OutsideStore``.

    Refused rather than cleaned up: a key with a ``.``, ``..`` or empty segment, a leading '/', a
    backslash, a '%' (so no layer can decode it into something else), NUL or any other control
    character, or more than ``MAX_KEY_CHARS`` UTF-8 bytes. Services build keys from ids, so
    nothing legitimate is refused.
    """
    if not isinstance(key, str) or not key:
        raise OutsideStore("escapes the store: an empty key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_CHARS:
        raise OutsideStore(f"escapes the store: a key longer than {MAX_KEY_CHARS} bytes")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or 0xD800 <= ord(ch) < 0xE000 for ch in key):
        raise OutsideStore(f"escapes the store: a control character in {key[:100]!a}")
    if "\\" in key or "%" in key:
        raise OutsideStore(f"escapes the store: '\\' or '%' in {key[:100]!r}")
    if key.startswith("/"):
        raise OutsideStore(f"escapes the store: an absolute key {key[:100]!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise OutsideStore(f"escapes the store: an empty, '.' or '..' segment in {key[:100]!r}")
    return key


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


def _capped(chunks: Iterator[bytes], max_bytes: int, what: str) -> Iterator[bytes]:
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"{what}: larger than the {max_bytes}-byte cap")
        yield chunk


class BlobStore(ABC):
    """Keys are relative, '/'-separated paths such as ``datasets/<id>.csv`` (see ``normalise_key``)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    """The default cap of every read (``iter_chunks``, ``get_bytes``, ``download``, ``verify``)."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def key_of(self, uri: str) -> str:
        """The key of ``uri`` in this store; ``OutsideStore`` if the URI names anything else."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, length: int = -1) -> BlobRef: ...

    @abstractmethod
    def _chunks(self, key: str) -> Iterator[bytes]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def iter_chunks(self, key: str, max_bytes: int | None = None) -> Iterator[bytes]:
        """The object's bytes; ``TooLarge`` once more than ``max_bytes`` (default ``self.max_bytes``)
        have come, so an endless source cannot exhaust memory or disk."""
        return _capped(self._chunks(key), self.max_bytes if max_bytes is None else max_bytes, self.uri(key))

    def put_bytes(self, key: str, data: bytes) -> BlobRef:
        return self.put_stream(key, io.BytesIO(data), len(data))

    def get_bytes(self, key: str, sha256: str | None = None, max_bytes: int | None = None) -> bytes:
        data = b"".join(self.iter_chunks(key, max_bytes))
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
            raise IntegrityError(f"{self.uri(key)}: sha256 mismatch")
        return data

    def download(self, key: str, path: Path, sha256: str | None = None, max_bytes: int | None = None) -> BlobRef:
        """Copy the object to ``path`` (atomically), checking ``sha256`` when given; at most
        ``max_bytes`` are written (``TooLarge`` past it, and no file is left)."""
        digest = hashlib.sha256()
        size = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.iter_chunks(key, max_bytes):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise IntegrityError(f"{self.uri(key)}: sha256 mismatch")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return BlobRef(uri=self.uri(key), sha256=digest.hexdigest(), size=size)

    def verify(self, key: str, sha256: str, max_bytes: int | None = None) -> BlobRef:
        """Read the object through and check it hashes to ``sha256``: call before serving or
        trusting an object someone else wrote. ``IntegrityError`` on a mismatch, ``TooLarge``
        past ``max_bytes``, ``BlobNotFound`` when missing."""
        digest = hashlib.sha256()
        size = 0
        for chunk in self.iter_chunks(key, max_bytes):
            digest.update(chunk)
            size += len(chunk)
        if digest.hexdigest() != sha256.lower():
            raise IntegrityError(f"{self.uri(key)}: sha256 mismatch")
        return BlobRef(uri=self.uri(key), sha256=digest.hexdigest(), size=size)


def _resolved_under(root: Path, key: str) -> Path:
    """``(root / key).resolve()`` for a resolved ``root`` and a ``normalise_key``-clean ``key``,
    without a system call past the first part that does not exist (nothing lies under it, so the
    rest is joined as it is, as ``resolve`` does): naming the objects of a ``Train`` (its rounds'
    URLs) no longer costs a file system walk per object. A symbolic link on the way is resolved
    as before."""
    parts = key.split("/")
    current = root
    for i, part in enumerate(parts):
        candidate = current / part
        try:
            mode = os.lstat(candidate).st_mode
        except OSError:
            return candidate.joinpath(*parts[i + 1 :])
        if stat.S_ISLNK(mode):
            return (root / key).resolve()
        current = candidate
    return current


class FileStore(BlobStore):
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._resolved: Path | None = None

    def _root(self) -> Path:
        """The root, resolved once it exists (a walk of its every component per object named was
        most of a start's decision: a ``Train`` names several); a key's own path is still resolved
        under it every time (a symlink out of the store is refused as before)."""
        if self._resolved is not None:
            return self._resolved
        root = self.root.resolve()
        if root.is_dir():
            self._resolved = root
        return root

    def _path(self, key: str) -> Path:
        """The file of ``key``, symlinks resolved, refused unless it lies inside the root."""
        normalise_key(key)
        root = self._root()
        path = _resolved_under(root, key)
        if path == root or not path.is_relative_to(root):  # strictly under the root
            raise OutsideStore(f"escapes the store: {key!r}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        if urlsplit(uri).scheme != "file":
            raise OutsideStore(f"escapes the store: {uri[:200]!r} is not a file:// object URI")
        raw = _file_path_text(uri, what="blob URI")
        for root in dict.fromkeys((self.root.absolute().as_posix(), self._root().as_posix())):
            prefix = root.rstrip("/") + "/"
            if raw.startswith(prefix):
                key = normalise_key(raw[len(prefix) :])
                self._path(key)  # no symlink out either
                return key
        raise OutsideStore(f"escapes the store: {uri[:200]!r} is not under {self.root.as_uri()}")

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

    def _chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            # O_NONBLOCK: opening a FIFO planted in the store must not hang; it is refused below.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # A folder is not an object: "a" when "a/b" exists is missing, as it is on S3.
            raise BlobNotFound(self.uri(key)) from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise BlobNotFound(self.uri(key))
            # a FIFO or device planted in the store: never an endless read
            raise OutsideStore(f"escapes the store: {key!r} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)


class S3Store(BlobStore):
    def __init__(
        self, bucket: str, prefix: str = "", settings: Settings | None = None, max_bytes: int | None = None
    ) -> None:
        from minio import Minio

        s = settings or get_settings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            normalise_key(self.prefix)
        self.max_bytes = s.blob_max_download_mb * MiB if max_bytes is None else max_bytes
        self.client = Minio(
            s.s3_endpoint,
            access_key=s.s3_access_key,
            secret_key=s.s3_secret_key,
            secure=s.s3_secure,
            region=s.s3_region,
        )

    def object_name(self, key: str) -> str:
        """The S3 object name of ``key`` (the prefix and the key)."""
        normalise_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_name(key)}"

    def key_of(self, uri: str) -> str:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or parts.query or parts.fragment:
            raise OutsideStore(f"escapes the store: {uri[:200]!r} is not an s3:// object URI")
        if parts.netloc != self.bucket:
            raise OutsideStore(f"escapes the store: {uri[:200]!r} is not in bucket {self.bucket!r}")
        name = unquote(parts.path).removeprefix("/")
        if self.prefix:
            if not name.startswith(self.prefix + "/"):
                raise OutsideStore(f"escapes the store: {uri[:200]!r} is not under {self.uri_root()}")
            name = name[len(self.prefix) + 1 :]
        return normalise_key(name)

    def uri_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def put_stream(self, key: str, stream: BinaryIO, length: int = -1) -> BlobRef:
        name = self.object_name(key)
        reader = _HashingReader(stream)
        part_size = 0 if length >= 0 else 16 * CHUNK
        self.client.put_object(self.bucket, name, reader, length=length, part_size=part_size)  # type: ignore[arg-type]
        return BlobRef(uri=self.uri(key), sha256=reader.hash.hexdigest(), size=reader.size)

    def _chunks(self, key: str) -> Iterator[bytes]:
        from minio.error import S3Error

        name = self.object_name(key)
        try:
            resp = self.client.get_object(self.bucket, name)
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
            self.client.stat_object(self.bucket, self.object_name(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self.object_name(key))


def _file_path(url: str, what: str = "file URL") -> Path:
    """The local path of a ``file:`` URL, percent-decoded as ``Path.as_uri()`` encodes it."""
    return Path(_file_path_text(url, what))


def _file_path_text(url: str, what: str = "file URL") -> str:
    """The percent-decoded path of a ``file:`` URL, as written (not normalised)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise ValueError(f"unsupported {what} {url[:200]!r}: use file:///absolute/path")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"unsupported {what} {url[:200]!r}: use file:///absolute/path")
    return path


def open_store(url: str, settings: Settings | None = None) -> BlobStore:
    """``file:///abs/dir`` or ``s3://bucket[/prefix]``."""
    parsed = urlsplit(url)
    if parsed.scheme == "file":
        root = _file_path(url)
        return FileStore(root, (settings or get_settings()).blob_max_download_mb * MiB)
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Store(parsed.netloc, unquote(parsed.path), settings)
    raise ValueError(f"unsupported blob store URL {url[:200]!r}: use file:///path or s3://bucket")


def resolve(uri: str, settings: Settings | None = None) -> tuple[BlobStore, str]:
    """The configured store (``settings.blob_url``) and the key of ``uri`` in it.

    ``OutsideStore`` (a ``ValueError``) for a URI the store does not hold: another folder or
    bucket, traversal, a symlink out. ``ValueError`` ("unsupported") for a scheme no store serves.
    """
    s = settings or get_settings()
    scheme = urlsplit(uri).scheme
    if scheme not in ("file", "s3"):
        raise ValueError(f"unsupported blob URI {uri[:200]!r}")
    store = open_store(s.blob_url, s)
    if scheme != urlsplit(s.blob_url).scheme:
        raise OutsideStore(f"escapes the store: {uri[:200]!r} is not in {s.blob_url}")
    return store, store.key_of(uri)
