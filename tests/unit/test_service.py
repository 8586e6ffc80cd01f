from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from embedpipe.batcher import MicroBatcher
from embedpipe.cache import MemoryTier, TieredCache
from embedpipe.cache.sqlite import SqliteTier
from embedpipe.embedders import ModelRegistry, ModelSpec
from embedpipe.embedders.base import TextForm
from embedpipe.errors import ModelNotFound
from embedpipe.service import EmbeddingService
from embedpipe.settings import BatchingSettings, CacheSettings
from tests.fakes import FakeEmbedder, vector_for


class Harness:
    def __init__(self) -> None:
        self.embedder = FakeEmbedder(name="fake")
        registry = ModelRegistry()
        registry.add(
            ModelSpec(name="fake", source="memory", aliases=("fake-alias",)), self.embedder
        )
        self.batcher = MicroBatcher(self.embedder, BatchingSettings(max_wait_ms=5.0))
        self.cache = TieredCache(MemoryTier(1 << 20), None)
        self.service = EmbeddingService(
            registry, {"fake": self.batcher}, self.cache, CacheSettings()
        )

    def computed(self) -> list[str]:
        return [text for call in self.embedder.calls for text in call]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    harness = Harness()
    harness.batcher.start()
    yield harness
    await harness.batcher.stop()


async def test_vectors_come_back_in_request_order(harness: Harness) -> None:
    result = await harness.service.embed("fake", ["b", "a", "c"])
    np.testing.assert_allclose(result.vectors, np.stack([vector_for(t) for t in ["b", "a", "c"]]))
    assert result.sources == ["computed"] * 3
    assert result.tokens == 9


async def test_duplicates_in_a_request_are_computed_once(harness: Harness) -> None:
    result = await harness.service.embed("fake", ["same", "other", "same", "same"])
    assert sorted(harness.computed()) == ["other", "same"]
    np.testing.assert_array_equal(result.vectors[0], result.vectors[2])


async def test_repeats_are_served_from_the_cache(harness: Harness) -> None:
    await harness.service.embed("fake", ["x", "y"])
    result = await harness.service.embed("fake-alias", ["y", "z"])
    assert result.sources == ["l1", "computed"]
    assert result.cached_count == 1
    assert result.model == "fake"
    assert harness.computed().count("y") == 1


async def test_concurrent_misses_share_one_computation(harness: Harness) -> None:
    harness.embedder.gate = threading.Event()
    requests = [asyncio.create_task(harness.service.embed("fake", ["hot"])) for _ in range(20)]
    await asyncio.sleep(0.05)
    harness.embedder.gate.set()
    results = await asyncio.gather(*requests)
    assert harness.computed() == ["hot"]
    for result in results:
        np.testing.assert_array_equal(result.vectors[0], vector_for("hot"))


def _served(source: str) -> float:
    labels = {"model": "fake", "source": source}
    return REGISTRY.get_sample_value("embedpipe_embeddings_total", labels) or 0.0


async def test_joins_of_a_computation_in_flight_count_as_shared(harness: Harness) -> None:
    before = {source: _served(source) for source in ("l1", "l2", "shared", "computed")}
    harness.embedder.gate = threading.Event()
    requests = [asyncio.create_task(harness.service.embed("fake", ["new text"])) for _ in range(16)]
    # Until all 16 wait on the one computation (the single-flight table is the condition).
    for _ in range(10_000):
        if any(item.waiters == 16 for item in harness.service._in_flight.values()):
            break
        await asyncio.sleep(0.001)
    else:
        pytest.fail("the 16 requests never joined one computation")
    harness.embedder.gate.set()
    results = await asyncio.gather(*requests)
    assert harness.computed() == ["new text"]
    assert sorted(result.sources[0] for result in results) == ["computed"] + ["shared"] * 15
    assert all(result.cached_count == 0 for result in results)  # saved work, not cache hits
    after = {source: _served(source) for source in before}
    assert {source: after[source] - before[source] for source in before} == {
        "l1": 0,
        "l2": 0,
        "shared": 15,
        "computed": 1,
    }


async def test_a_cancelled_waiter_does_not_cancel_the_others(harness: Harness) -> None:
    harness.embedder.gate = threading.Event()
    blocker = asyncio.create_task(harness.service.embed("fake", ["blocker"]))
    await asyncio.sleep(0.02)
    leaving = asyncio.create_task(harness.service.embed("fake", ["shared"]))
    staying = asyncio.create_task(harness.service.embed("fake", ["shared"]))
    await asyncio.sleep(0.02)
    leaving.cancel()
    harness.embedder.gate.set()
    result = await staying
    await blocker
    np.testing.assert_array_equal(result.vectors[0], vector_for("shared"))


async def test_a_request_whose_client_left_is_not_computed(harness: Harness) -> None:
    harness.embedder.gate = threading.Event()
    blocker = asyncio.create_task(harness.service.embed("fake", ["blocker"]))
    await asyncio.sleep(0.02)
    gone = asyncio.create_task(harness.service.embed("fake", ["nobody waits for me"]))
    await asyncio.sleep(0.02)
    gone.cancel()
    harness.embedder.gate.set()
    await blocker
    await asyncio.sleep(0.05)
    assert "nobody waits for me" not in harness.computed()


async def test_unknown_model(harness: Harness) -> None:
    with pytest.raises(ModelNotFound):
        await harness.service.embed("nope", ["x"])


class SqliteHarness:
    """A service over the fake model with a real SQLite L2 (call :meth:`open`, then
    :meth:`close`)."""

    def __init__(self, path: Path, max_wait_ms: float) -> None:
        self.path = path
        self.embedder = FakeEmbedder(name="fake")
        registry = ModelRegistry()
        registry.add(ModelSpec(name="fake", source="memory"), self.embedder)
        self.registry = registry
        self.batcher = MicroBatcher(self.embedder, BatchingSettings(max_wait_ms=max_wait_ms))

    async def open(self) -> EmbeddingService:
        self.l2 = await SqliteTier(self.path / "cache.sqlite3", 1 << 20, 0).open()
        self.cache = TieredCache(MemoryTier(1 << 20), self.l2)
        service = EmbeddingService(
            self.registry, {"fake": self.batcher}, self.cache, CacheSettings()
        )
        self.batcher.start()
        return service

    async def close(self) -> None:
        await self.batcher.stop()
        await self.cache.close()


async def test_a_corrupt_or_foreign_l2_entry_is_a_miss_never_served(tmp_path: Path) -> None:
    """Whoever wrote a wrong-sized value under a key (a bug, a foreign writer, a truncated
    write), it is recomputed, not served and not a 500."""
    harness = SqliteHarness(tmp_path, max_wait_ms=0.0)
    service = await harness.open()
    try:
        keys = service._keys(harness.embedder, ["short", "odd", "long"])
        await harness.l2.set_many(
            {keys[0]: b"\x00" * 12, keys[1]: b"\x01" * 7, keys[2]: b"\x00" * 64}
        )
        result = await service.embed("fake", ["short", "odd", "long"])
        assert result.sources == ["computed"] * 3
        np.testing.assert_allclose(result.vectors[0], vector_for("short"))
    finally:
        await harness.close()


async def test_each_text_form_has_its_own_entries_and_model_calls(harness: Harness) -> None:
    """A prompt kept apart from the text, or the other truncation side, is another vector:
    never served from the plain form's entry, and texts of several forms that meet in one
    batch are computed in one model call per form."""
    apart = TextForm(prompt="query: ")
    left = TextForm(truncation="left")
    plain, prompted, cut_left = await asyncio.gather(
        harness.service.embed("fake", ["text"]),
        harness.service.embed("fake", ["text"], form=apart),
        harness.service.embed("fake", ["text"], form=left),
    )
    np.testing.assert_allclose(prompted.vectors[0], vector_for("query: text"))
    np.testing.assert_allclose(plain.vectors[0], vector_for("text"))
    assert [result.sources for result in (plain, prompted, cut_left)] == [["computed"]] * 3
    assert harness.computed() == ["text", "text", "text"]
    again = await harness.service.embed("fake", ["text"], form=apart)
    assert again.sources == ["l1"]
    np.testing.assert_array_equal(again.vectors, prompted.vectors)
    counts = await harness.service.count_tokens("fake", ["text"], apart)
    assert counts == [4]  # the prompt's tokens count: "query:" "text" + 2 specials


async def test_misses_of_concurrent_requests_share_a_model_call(tmp_path: Path) -> None:
    """A request still looking up L2 is company worth waiting for (issue 20: a lone request
    no longer waits, so the wait must still gather requests that are on their way)."""
    harness = SqliteHarness(tmp_path, max_wait_ms=1000.0)
    service = await harness.open()
    many = [f"text {i}" for i in range(4000)]
    try:
        # The short request's lookup ends first; the long one's is still running then.
        alone, crowd = await asyncio.gather(
            service.embed("fake", ["solo"]), service.embed("fake", many)
        )
    finally:
        await harness.close()
    calls = harness.embedder.calls
    assert "solo" in calls[0]
    assert len(calls[0]) > 1
    assert sorted(text for call in calls for text in call) == sorted([*many, "solo"])
    np.testing.assert_allclose(alone.vectors[0], vector_for("solo"))
    np.testing.assert_allclose(crowd.vectors[7], vector_for("text 7"))
