"""The cache-hit path of the service: answers from L1 with no tokenizer and no task, token
counts that equal the tokenizer's, and float16 storage that answers the same on hit and miss."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from embedpipe.batcher import MicroBatcher
from embedpipe.cache import MemoryTier, SqliteTier, TieredCache, VectorCodec
from embedpipe.cache.keys import StoreDtype
from embedpipe.embedders import ModelRegistry, ModelSpec
from embedpipe.embedders.base import PLAIN, TextForm
from embedpipe.service import EmbeddingService
from embedpipe.settings import BatchingSettings, CacheSettings
from tests.fakes import FakeEmbedder, vector_for


class CountingEmbedder(FakeEmbedder):
    """Records which texts were tokenized."""

    def __init__(self) -> None:
        super().__init__(name="fake", dimensions=16)
        self.tokenized: list[str] = []

    def count_tokens(self, texts: Sequence[str], form: TextForm = PLAIN) -> list[int]:
        self.tokenized.extend(texts)
        return super().count_tokens(texts, form)


class Stack:
    def __init__(self, l2: SqliteTier, store_dtype: StoreDtype = "float32") -> None:
        self.embedder = CountingEmbedder()
        registry = ModelRegistry()
        registry.add(ModelSpec(name="fake", source="memory"), self.embedder)
        self.batcher = MicroBatcher(self.embedder, BatchingSettings(max_wait_ms=0.0))
        self.cache = TieredCache(MemoryTier(1 << 20), l2)
        settings = CacheSettings(store_dtype=store_dtype)
        self.service = EmbeddingService(registry, {"fake": self.batcher}, self.cache, settings)

    async def embed(self, texts: list[str]) -> tuple[list[int], np.ndarray]:
        tokens = await self.service.count_tokens("fake", texts)
        result = self.service.embed_from_memory("fake", texts, tokens)
        if result is None:
            result = await self.service.embed("fake", texts, tokens)
        assert result.tokens == sum(tokens)
        return tokens, result.vectors


@pytest.fixture
async def l2(tmp_path: Path) -> AsyncIterator[SqliteTier]:
    tier = await SqliteTier(tmp_path / "cache.sqlite3", 0, 0).open()
    yield tier
    await tier.close()


@pytest.fixture
async def stack(l2: SqliteTier) -> AsyncIterator[Stack]:
    stack = Stack(l2)
    stack.batcher.start()
    yield stack
    await stack.batcher.stop()


async def test_a_hit_is_not_tokenized_again_and_counts_the_same(stack: Stack) -> None:
    texts = ["one two three", "four", "one two three"]
    first_tokens, first = await stack.embed(texts)
    assert stack.embedder.tokenized == texts
    again_tokens, again = await stack.embed(["four", "one two three", "five six"])
    assert stack.embedder.tokenized == [*texts, "five six"]  # only the new text
    assert again_tokens == [first_tokens[1], first_tokens[0], 4]
    np.testing.assert_array_equal(again[:2], first[[1, 0]])


async def test_from_memory_answers_only_when_every_text_is_in_l1(stack: Stack) -> None:
    await stack.embed(["cached"])
    l1 = stack.cache.l1
    lookups = (l1.hits, l1.misses)
    assert stack.service.embed_from_memory("fake", ["cached", "new"], [3, 3]) is None
    assert (l1.hits, l1.misses) == lookups  # nothing counted: embed() will count its own
    result = stack.service.embed_from_memory("fake", ["cached", "cached"], [3, 3])
    assert result is not None
    assert result.sources == ["l1", "l1"] and result.tokens == 6
    np.testing.assert_array_equal(result.vectors, np.stack([vector_for("cached", 16)] * 2))


async def test_an_l2_hit_is_counted_once_then_served_from_memory(l2: SqliteTier) -> None:
    writer = Stack(l2)  # another replica, sharing L2
    writer.batcher.start()
    try:
        _, written = await writer.embed(["shared text"])
        await writer.cache.flush()  # the answer did not wait for its L2 write
    finally:
        await writer.batcher.stop()
    reader = Stack(l2)
    reader.batcher.start()
    try:
        await reader.embed(["shared text"])  # from L2: tokenized for the budget, promoted
        await reader.embed(["shared text"])  # from L1 with its count
        assert reader.embedder.tokenized == ["shared text"]
        assert reader.embedder.calls == []
        _, vectors = await reader.embed(["shared text"])
        np.testing.assert_array_equal(vectors, written)
    finally:
        await reader.batcher.stop()


async def test_float16_storage_answers_the_same_on_miss_and_hit_in_its_own_keys(
    l2: SqliteTier,
) -> None:
    half = Stack(l2, store_dtype="float16")
    full = Stack(l2, store_dtype="float32")
    for stack in (half, full):
        stack.batcher.start()
    try:
        _, miss = await half.embed(["a text to store in half precision"])
        _, hit = await half.embed(["a text to store in half precision"])
        np.testing.assert_array_equal(miss, hit)
        exact = vector_for("a text to store in half precision", 16)
        np.testing.assert_array_equal(miss[0], VectorCodec("float16").round_trip(exact))
        assert float(miss[0] @ exact) > 0.9999
        # The float32 server sharing this L2 does not take the float16 entry for its own.
        _, other = await full.embed(["a text to store in half precision"])
        np.testing.assert_array_equal(other[0], exact)
        assert full.embedder.calls == [["a text to store in half precision"]]
        # Answers do not wait for their L2 writes: the count waits for them.
        await half.cache.flush()
        await full.cache.flush()
        stats = await l2.stats()
        assert stats.entries == 2
    finally:
        for stack in (half, full):
            await stack.batcher.stop()
