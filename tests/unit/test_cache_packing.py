"""The L2 packing is lossless for every float32 unit vector, leaves anything else untouched,
and never mistakes one format for the other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embedpipe.cache import MemoryTier, TieredCache
from embedpipe.cache.packing import pack_many, unpack_many
from embedpipe.cache.sqlite import SqliteTier

# Every float32 a unit vector can hold (magnitude below 2), subnormals and -0.0 included.
_LARGEST = float(np.nextafter(np.float32(2.0), np.float32(0.0)))
_COMPONENTS = st.floats(-_LARGEST, _LARGEST, width=32, allow_subnormal=True)


@given(
    st.lists(
        arrays(np.float32, st.sampled_from([16, 24, 384, 1024]), elements=_COMPONENTS),
        min_size=1,
        max_size=5,
    )
)
def test_vectors_come_back_bit_for_bit(vectors: list[np.ndarray]) -> None:
    raw = [vector.astype("<f4").tobytes() for vector in vectors]
    packed = pack_many(raw)
    assert all(len(p) < len(r) and len(p) % 2 == 1 for p, r in zip(packed, raw, strict=True))
    assert unpack_many(packed) == raw


def test_a_384_d_vector_fits_the_smaller_redis_allocation() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype("<f4")
    vector /= np.linalg.norm(vector)
    (packed,) = pack_many([vector.tobytes()])
    # Under 1,536 B with Redis's string header (5 B) and terminator: jemalloc's 1,536 class.
    assert len(packed) + 6 <= 1536


def test_what_cannot_be_packed_is_stored_as_it_is() -> None:
    unnormalised = np.full(384, 3.0, dtype="<f4").tobytes()  # bit 30 set
    odd_size = np.full(12, 0.5, dtype="<f4").tobytes()  # not whole groups of 8
    score = np.float32(0.25).tobytes()
    tiny = np.full(8, 0.5, dtype="<f4").tobytes()  # packing would not save a byte
    half = np.full(7, 0.5, dtype="<f2").tobytes()  # float16 store dtype, 14 bytes
    values = [unnormalised, odd_size, tiny, score, half, b""]
    assert pack_many(values) == values
    assert unpack_many([*values, None]) == [*values, None]


def test_a_mixed_request_keeps_its_order() -> None:
    unit = np.zeros(16, dtype="<f4")
    unit[3] = -1.0
    values = [unit.tobytes(), b"x" * 4, (unit * 0.5).tobytes(), np.full(16, 5.0, "<f4").tobytes()]
    assert unpack_many(pack_many(values)) == values


async def test_l2_holds_packed_vectors_and_l1_raw_ones(tmp_path: Path) -> None:
    l2 = await SqliteTier(tmp_path / "cache.sqlite3", 0, 0).open()
    cache = TieredCache(MemoryTier(1 << 20), l2)
    try:
        vector = np.zeros(384, dtype="<f4")
        vector[0] = 1.0
        await cache.set_many({"k": vector.tobytes()})
        (stored,) = await l2.get_many(["k"])
        assert stored is not None and len(stored) == 1489
        await cache.l1.clear()
        assert await cache.get_many(["k"]) == [(vector.tobytes(), "l2")]
        assert cache.l1.get("k") == vector.tobytes()  # promoted unpacked
    finally:
        await cache.close()
