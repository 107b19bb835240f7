"""The parsed-dataset cache: LRU within a byte budget, counters, one parse for concurrent askers."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from swarmtrain.peer.cache import CacheStats, ParsedCache, tensors_nbytes


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def blob(n: int) -> bytes:
    return b"x" * n


def test_hits_misses_and_lru_eviction_within_the_budget() -> None:
    cache: ParsedCache[bytes] = ParsedCache(max_bytes=300, size_of=len)
    loads: list[str] = []

    def loader(name: str, n: int = 100) -> bytes:
        loads.append(name)
        return blob(n)

    for name in ("a", "b", "c"):
        cache.get_or_load(sha(name), lambda name=name: loader(name))  # type: ignore[misc]
    assert cache.get_or_load(sha("a"), lambda: loader("a-again")) == blob(100)  # a is now the most recent
    cache.get_or_load(sha("d"), lambda: loader("d"))  # over budget: b, the least recent, goes
    assert sha("b") not in cache
    assert all(sha(n) in cache for n in "acd")
    assert loads == ["a", "b", "c", "d"]
    assert cache.get(sha("b")) is None
    assert cache.stats() == CacheStats(hits=1, misses=5, evictions=1, too_large=0, entries=3, bytes=300, max_bytes=300)


def test_a_value_larger_than_the_budget_is_returned_but_not_kept() -> None:
    cache: ParsedCache[bytes] = ParsedCache(max_bytes=10, size_of=len)
    cache.put(sha("small"), blob(5))
    assert cache.get_or_load(sha("big"), lambda: blob(11)) == blob(11)
    assert sha("big") not in cache and sha("small") in cache
    assert cache.stats().too_large == 1


def test_replacing_an_entry_keeps_the_byte_count_right() -> None:
    cache: ParsedCache[bytes] = ParsedCache(max_bytes=100, size_of=len)
    cache.put(sha("a"), blob(60))
    cache.put(sha("a"), blob(30))
    cache.put(sha("b"), blob(70))
    assert cache.stats().bytes == 100 and cache.stats().evictions == 0
    cache.discard(sha("a"))
    assert cache.stats().bytes == 70 and cache.stats().entries == 1


def test_keys_are_sha256_digests() -> None:
    cache: ParsedCache[bytes] = ParsedCache(max_bytes=10, size_of=len)
    with pytest.raises(ValueError, match="sha256"):
        cache.get("../etc/passwd")
    cache.put(sha("a").upper(), blob(1))
    assert sha("a") in cache


def test_a_failed_load_is_not_kept_and_reaches_the_caller() -> None:
    cache: ParsedCache[bytes] = ParsedCache(max_bytes=10, size_of=len)

    def broken() -> bytes:
        raise ValueError("line 3: 2 fields, the header has 3")

    with pytest.raises(ValueError, match="line 3"):
        cache.get_or_load(sha("a"), broken)
    assert sha("a") not in cache
    assert cache.get_or_load(sha("a"), lambda: blob(2)) == blob(2)


def test_concurrent_askers_for_one_dataset_parse_it_once() -> None:
    cache: ParsedCache[bytes] = ParsedCache(max_bytes=1000, size_of=len)
    entered, release = threading.Event(), threading.Event()
    loads = 0

    def slow_parse() -> bytes:
        nonlocal loads
        loads += 1
        entered.set()
        assert release.wait(30)
        return blob(10)

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(cache.get_or_load, sha("a"), slow_parse)
        assert entered.wait(30)
        others = [pool.submit(cache.get_or_load, sha("a"), slow_parse) for _ in range(3)]
        release.set()
        results = [first.result(30), *(f.result(30) for f in others)]
    assert results == [blob(10)] * 4
    assert loads == 1
    assert cache.stats().misses == 1 and cache.stats().hits == 3


def test_tensor_sizes() -> None:
    x, y = torch.zeros(10, 4, dtype=torch.float32), torch.zeros(10, dtype=torch.int64)
    assert tensors_nbytes(x, y) == 10 * 4 * 4 + 10 * 8
