"""Parsed datasets kept in memory by content hash, so only a peer's first session on a dataset parses it.

A bounded LRU cache: entries are keyed by the dataset's sha256 (the one ``SessionRequested``
carries and the blob store checked), sized in bytes by ``size_of``, and the least recently used
are dropped once the total passes ``max_bytes``. A value larger than the whole budget is returned
but not kept. Thread-safe: training runs off the event loop, maybe several jobs at once; two that
ask for the same missing dataset at the same time parse it once (the second waits for the first).

The cached value is shared by every job that gets it: callers must not change its tensors in
place (index them, which copies, as the trainer does).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CacheStats:
    """Counters for the peer's metrics: ``hits`` are sessions that skipped the parse."""

    hits: int
    misses: int
    evictions: int
    too_large: int
    """Values bigger than the whole budget: returned, not kept."""
    entries: int
    bytes: int
    max_bytes: int


class ParsedCache(Generic[T]):
    def __init__(self, max_bytes: int, size_of: Callable[[T], int]) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 or more, got {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._hits = self._misses = self._evictions = self._too_large = 0

    def get(self, sha256: str) -> T | None:
        """The cached value (now the most recently used), or ``None``; counts a hit or a miss."""
        key = _key(sha256)
        with self._lock:
            found = self._touch(key)
            if found is None:
                self._misses += 1
                return None
            self._hits += 1
            return found[0]

    def put(self, sha256: str, value: T) -> None:
        key = _key(sha256)
        size = self._size_of(value)
        with self._lock:
            self._store(key, value, size)

    def get_or_load(self, sha256: str, load: Callable[[], T]) -> T:
        """The cached value, or ``load()``'s, kept. Concurrent callers for one key load it once.

        An exception from ``load`` reaches its caller and nothing is kept.
        """
        key = _key(sha256)
        with self._lock:
            found = self._touch(key)
            if found is not None:
                self._hits += 1
                return found[0]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                found = self._touch(key)  # loaded by another caller while this one waited?
                if found is not None:
                    self._hits += 1
                    return found[0]
                self._misses += 1
            try:
                value = load()
                size = self._size_of(value)
                with self._lock:
                    self._store(key, value, size)
                return value
            finally:
                with self._lock:
                    if self._loading.get(key) is gate:
                        del self._loading[key]

    def discard(self, sha256: str) -> None:
        key = _key(sha256)
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                too_large=self._too_large,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
            )

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return _key(sha256) in self._entries

    # ------------------------------------------------------------------ under the lock

    def _touch(self, key: str) -> tuple[T] | None:
        """The entry's value (in a 1-tuple, as a value may be falsy), now the most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return (entry[0],)

    def _store(self, key: str, value: T, size: int) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.max_bytes:
            self._too_large += 1
            return
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped
            self._evictions += 1


def _key(sha256: str) -> str:
    key = sha256.lower()
    if not _SHA256.match(key):
        raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
    return key


def tensors_nbytes(*tensors: object) -> int:
    """Bytes held by the given tensors (anything with ``nbytes``, or ``element_size() * numel()``)."""
    total = 0
    for t in tensors:
        nbytes = getattr(t, "nbytes", None)
        if isinstance(nbytes, int):
            total += nbytes
        else:
            total += int(t.element_size() * t.numel())  # type: ignore[attr-defined]
    return total
