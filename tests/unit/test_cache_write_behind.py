"""An online answer does not wait for its L2 write; nothing that reads L2 through the cache
(stats, clear, close) misses a write on its way, and a stalled L2 holds writers back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from embedpipe import metrics
from embedpipe.batcher import MicroBatcher
from embedpipe.cache import MemoryTier, TieredCache
from embedpipe.cache.base import TierStats
from embedpipe.cache.packing import unpack_many
from embedpipe.cache.sqlite import SqliteTier
from embedpipe.cache.write_behind import WriteBehind
from embedpipe.embedders import ModelRegistry, ModelSpec
from embedpipe.service import EmbeddingService
from embedpipe.settings import BatchingSettings, CacheSettings
from tests.fakes import FakeEmbedder, vector_for


def _value(seed: int) -> bytes:
    return vector_for(f"text {seed}", 16).tobytes()


def _pending() -> float:
    return float(metrics.CACHE_WRITES_PENDING.labels(tier="l2")._value.get())


class GatedTier:
    """An L2 whose writes wait until the test opens the gate (a stalled Redis, say)."""

    name = "l2"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.written: dict[str, bytes] = {}
        self.writers_waiting = 0
        self.calls = 0
        self._arrived = asyncio.Condition()

    async def wait_for_writers(self, count: int) -> None:
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.writers_waiting >= count)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.written.get(key) for key in keys]

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        self.calls += 1
        async with self._arrived:
            self.writers_waiting += 1
            self._arrived.notify_all()
        await self.gate.wait()
        self.writers_waiting -= 1
        self.written.update(items)

    async def stats(self) -> TierStats:
        return TierStats("l2", 0, 0, 0, len(self.written), None, True)

    async def clear(self) -> None:
        self.written.clear()

    async def close(self) -> None:
        pass


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SqliteTier]:
    tier = await SqliteTier(tmp_path / "cache.sqlite3", 0, 0).open()
    yield tier
    await tier.close()


async def test_an_answer_returns_with_l1_written_and_l2_follows(sqlite: SqliteTier) -> None:
    cache = TieredCache(MemoryTier(1 << 20), sqlite)
    await cache.set_many({"k": _value(1)}, {"k": 7}, wait=False)
    assert cache.l1.peek("k") == (_value(1), 7)
    assert cache.pending_writes == 1 and _pending() == 1
    await cache.flush()
    assert cache.pending_writes == 0 and _pending() == 0
    assert unpack_many(await sqlite.get_many(["k"])) == [_value(1)]


async def test_the_entries_of_concurrent_answers_go_in_one_l2_call() -> None:
    tier = GatedTier()
    tier.gate.set()
    cache = TieredCache(MemoryTier(1 << 20), tier)
    await asyncio.gather(*(cache.set_many({f"k{i}": _value(i)}, wait=False) for i in range(5)))
    await cache.flush()
    assert tier.calls == 1 and len(tier.written) == 5


async def test_stats_count_the_writes_behind_the_answers_given(sqlite: SqliteTier) -> None:
    cache = TieredCache(MemoryTier(1 << 20), sqlite)
    await cache.set_many({f"k{i}": _value(i) for i in range(3)}, wait=False)
    l2_stats = (await cache.stats())[1]
    assert l2_stats.entries == 3


async def test_a_clear_is_not_undone_by_a_write_in_flight() -> None:
    tier = GatedTier()
    cache = TieredCache(MemoryTier(1 << 20), tier)
    await cache.set_many({"k": _value(1)}, wait=False)
    clearing = asyncio.ensure_future(cache.clear())
    await asyncio.sleep(0)
    assert not clearing.done()  # it waits for the write
    tier.gate.set()
    await clearing
    assert tier.written == {} and cache.l1.peek("k") is None


async def test_a_stalled_l2_holds_writers_back_past_the_bound() -> None:
    tier = GatedTier()
    cache = TieredCache(MemoryTier(1 << 20), tier, WriteBehind(tier, max_unwritten=2))
    await cache.set_many({"a": _value(1)}, wait=False)
    await asyncio.wait_for(tier.wait_for_writers(1), 30)  # "a" is stuck in the stalled tier
    second = asyncio.ensure_future(cache.set_many({"b": _value(2)}, wait=False))
    await asyncio.sleep(0.05)
    # Two entries unwritten: the second writer waits, no entry piles up behind a stalled tier.
    assert cache.pending_writes == 2 and not second.done()
    assert cache.l1.peek("b") is not None  # this process serves it meanwhile
    tier.gate.set()
    await asyncio.wait_for(second, 30)
    await cache.close()
    assert set(tier.written) == {"a", "b"} and cache.pending_writes == 0


async def test_batch_work_waits_for_its_writes(sqlite: SqliteTier) -> None:
    cache = TieredCache(MemoryTier(1 << 20), sqlite)
    await cache.set_many({"k": _value(1)})
    assert cache.pending_writes == 0
    assert unpack_many(await sqlite.get_many(["k"])) == [_value(1)]


async def test_an_online_answer_does_not_wait_for_l2_and_batch_work_does() -> None:
    tier = GatedTier()
    embedder = FakeEmbedder(name="fake", dimensions=16)
    registry = ModelRegistry()
    registry.add(ModelSpec(name="fake", source="memory"), embedder)
    batcher = MicroBatcher(embedder, BatchingSettings(max_wait_ms=0.0))
    cache = TieredCache(MemoryTier(1 << 20), tier)
    service = EmbeddingService(registry, {"fake": batcher}, cache, CacheSettings())
    batcher.start()
    try:
        online = await asyncio.wait_for(service.embed("fake", ["asked online"]), 30)
        assert online.sources == ["computed"] and tier.written == {}
        assert cache.pending_writes == 1
        background = asyncio.ensure_future(service.embed("fake", ["a job's"], background=True))
        await asyncio.wait_for(tier.wait_for_writers(2), 30)
        assert not background.done()  # a batch line waits for its write
        durable = asyncio.ensure_future(service.embed("fake", ["a chunk's"], durable=True))
        await asyncio.wait_for(tier.wait_for_writers(3), 30)
        assert not durable.done()  # so does a dataset chunk
        tier.gate.set()
        assert (await asyncio.wait_for(background, 30)).sources == ["computed"]
        assert (await asyncio.wait_for(durable, 30)).sources == ["computed"]
        await cache.flush()
        assert len(tier.written) == 3
    finally:
        await batcher.stop()
