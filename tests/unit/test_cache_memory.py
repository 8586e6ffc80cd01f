"""L1, key derivation, the value encoding and the tiered cache over L1 alone."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from embedpipe.cache import (
    MemoryTier,
    TieredCache,
    bytes_to_vector,
    cache_key,
    vector_to_bytes,
)
from embedpipe.cache.memory import ENTRY_OVERHEAD


def cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


def test_cache_key_is_namespace_fingerprint_and_sha256_of_the_exact_text() -> None:
    text = "héllo wörld"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert cache_key("ep", "fp1", text) == f"ep:fp1:{digest}"
    assert cache_key("ep", "fp1", text) != cache_key("ep", "fp1", text + " ")
    assert cache_key("ep", "fp1", text) != cache_key("ep", "fp2", text)


def test_vectors_are_little_endian_float32() -> None:
    vector = np.array([1.5, -2.25, 3.0], dtype=np.float64)
    data = vector_to_bytes(vector)
    assert data == struct.pack("<3f", 1.5, -2.25, 3.0)
    assert vector_to_bytes(vector.astype(">f4")) == data  # big-endian input is converted
    back = bytes_to_vector(data)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, vector.astype(np.float32))
    assert len(vector_to_bytes(np.zeros(384, dtype=np.float32))) == 1536


def test_get_put_and_counters() -> None:
    l1 = MemoryTier(1 << 20)
    assert l1.get("a") is None
    l1.put("a", b"1")
    assert l1.get("a") == b"1"
    assert (l1.hits, l1.misses, len(l1)) == (1, 1, 1)


def test_bounded_in_bytes_and_evicts_least_recently_used() -> None:
    value = bytes(1000)
    per_entry = cost("k0", value)
    l1 = MemoryTier(3 * per_entry)
    for key in ("k0", "k1", "k2"):
        l1.put(key, value)
    assert l1.get("k0") == value  # k0 is now the most recently used
    l1.put("k3", value)
    assert l1.get("k1") is None  # the least recently used went
    assert {k for k in ("k0", "k2", "k3") if l1.get(k) is not None} == {"k0", "k2", "k3"}
    assert l1.size_bytes == 3 * per_entry <= l1.max_bytes
    assert l1.evictions == 1


def test_replacing_a_key_accounts_its_new_size() -> None:
    l1 = MemoryTier(1 << 20)
    l1.put("k", bytes(100))
    l1.put("k", bytes(10))
    assert l1.size_bytes == cost("k", bytes(10))
    assert len(l1) == 1


def test_a_value_larger_than_the_budget_is_not_stored() -> None:
    l1 = MemoryTier(500)
    l1.put("small", b"x")
    l1.put("small", bytes(1000))  # too big now: the stale copy goes too
    assert l1.get("small") is None
    assert l1.size_bytes == 0


def test_zero_bytes_disables_it() -> None:
    l1 = MemoryTier(0)
    l1.put("k", b"v")
    assert l1.get("k") is None
    assert len(l1) == 0


def test_negative_budget_is_rejected() -> None:
    with pytest.raises(ValueError):
        MemoryTier(-1)


async def test_protocol_methods_and_stats() -> None:
    l1 = MemoryTier(1 << 20)
    await l1.set_many({"a": b"1", "b": b"2"})
    assert await l1.get_many(["a", "x", "b"]) == [b"1", None, b"2"]
    stats = await l1.stats()
    assert (stats.name, stats.hits, stats.misses, stats.entries) == ("l1", 2, 1, 2)
    assert stats.bytes == l1.size_bytes and stats.healthy
    assert stats.hit_ratio == pytest.approx(2 / 3)
    await l1.clear()
    assert len(l1) == 0 and l1.size_bytes == 0


async def test_tiered_without_l2_reports_l1_hits_in_order() -> None:
    cache = TieredCache(MemoryTier(1 << 20), None)
    await cache.set_many({"a": b"1"})
    assert await cache.get_many(["a", "b", "a"]) == [(b"1", "l1"), None, (b"1", "l1")]
    assert [s.name for s in await cache.stats()] == ["l1"]
    await cache.close()
