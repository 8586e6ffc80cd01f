"""How vectors are stored (float32 or float16) and the token counts L1 keeps beside them."""

from __future__ import annotations

import numpy as np
import pytest

from embedpipe.cache import MemoryTier, TieredCache, VectorCodec, vector_to_bytes
from embedpipe.cache.memory import ENTRY_OVERHEAD
from tests.fakes import vector_for


def test_float32_is_exact_and_keeps_the_model_fingerprint() -> None:
    codec = VectorCodec("float32")
    vector = vector_for("exact", 384)
    assert codec.encode(vector) == vector_to_bytes(vector)  # the wire format, 1,536 bytes
    np.testing.assert_array_equal(codec.decode(codec.encode(vector)), vector)
    matrix = vector[None, :]
    assert codec.round_trip(matrix) is matrix  # nothing to round: no copy either
    assert codec.fingerprint("abc") == "abc"


def test_float16_halves_the_bytes_has_its_own_keys_and_round_trips_as_decoded() -> None:
    codec = VectorCodec("float16")
    vectors = np.stack([vector_for(f"text {i}", 384) for i in range(50)])
    stored = [codec.encode(vector) for vector in vectors]
    assert {len(data) for data in stored} == {768}
    decoded = np.stack([codec.decode(data) for data in stored])
    assert decoded.dtype == np.float32
    cosines = (decoded * vectors).sum(axis=1) / np.linalg.norm(decoded, axis=1)
    assert cosines.min() > 0.9999
    # A computed answer is rounded exactly as a later hit decodes it.
    np.testing.assert_array_equal(codec.round_trip(vectors), decoded)
    assert codec.fingerprint("abc") != VectorCodec("float32").fingerprint("abc")


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError):
        VectorCodec("int8")  # type: ignore[arg-type]


def test_l1_keeps_token_counts_and_peek_counts_nothing() -> None:
    l1 = MemoryTier(1 << 20)
    l1.put("a", b"1", tokens=7)
    assert l1.peek("a") == (b"1", 7)
    assert l1.peek("missing") is None
    assert (l1.hits, l1.misses) == (0, 0)
    l1.put("a", b"1")  # promoted again from L2, without a count: the known one stays
    assert l1.peek("a") == (b"1", 7)


def test_get_all_is_all_or_nothing() -> None:
    l1 = MemoryTier(3 * (1 + 1 + ENTRY_OVERHEAD))
    for key in ("a", "b", "c"):
        l1.put(key, key.encode())
    assert l1.get_all(["a", "x"]) is None
    assert (l1.hits, l1.misses) == (0, 0)
    assert l1.get_all(["a", "b"]) == [b"a", b"b"]
    assert l1.hits == 2
    l1.put("d", b"d")  # "c" is now the least recently used and goes
    assert l1.peek("c") is None and l1.peek("a") is not None


async def test_tiered_cache_keeps_counts_on_write_and_on_promotion() -> None:
    l2 = MemoryTier(1 << 20)  # any tier will do as L2 here
    cache = TieredCache(MemoryTier(1 << 20), l2)
    await cache.set_many({"k": b"v"}, tokens={"k": 5})
    assert cache.l1.peek("k") == (b"v", 5)
    await l2.set_many({"only-l2": b"w"})
    found = await cache.get_many(["only-l2", "k"], tokens=[9, 5])
    assert found == [(b"w", "l2"), (b"v", "l1")]
    assert cache.l1.peek("only-l2") == (b"w", 9)
