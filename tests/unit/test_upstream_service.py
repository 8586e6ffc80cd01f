"""An upstream model behind the real EmbeddingService: one cache entry per size, no upstream
call for cached text, the tokens and dollars it saved, and a model that has not answered yet."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
from prometheus_client import REGISTRY

from embedpipe.cache import MemoryTier, TieredCache
from embedpipe.embedders import ModelRegistry, ModelSpec
from embedpipe.errors import InvalidInput
from embedpipe.service import EmbeddingService
from embedpipe.settings import CacheSettings, UpstreamSettings
from embedpipe.upstream import UpstreamBatcher, UpstreamClient, UpstreamModel
from embedpipe.upstream.model import public_url
from tests.fakes import FakeUpstream, vector_for

PRICE = 2.0  # dollars per million tokens


class Proxy:
    """A service whose one model ``name`` is served by ``upstream`` (8-d vectors)."""

    def __init__(self, upstream: FakeUpstream, cache: TieredCache, name: str) -> None:
        settings = UpstreamSettings(max_wait_ms=1.0)
        self.model = UpstreamModel(
            name, "emb-model", "http://upstream.test/v1", price_per_million_tokens=PRICE
        )
        client = UpstreamClient(name, "emb-model", upstream.sdk(), settings)
        self.batcher = UpstreamBatcher(self.model, client, settings)
        registry = ModelRegistry()
        registry.add(ModelSpec(name=name, source="emb-model", backend="openai"), self.model)
        self.service = EmbeddingService(registry, {name: self.batcher}, cache, CacheSettings())


@pytest.fixture
async def proxies() -> AsyncIterator[list[Proxy]]:
    started: list[Proxy] = []
    yield started
    for proxy in started:
        await proxy.batcher.stop()


def _open(proxies: list[Proxy], upstream: FakeUpstream, cache: TieredCache, name: str) -> Proxy:
    proxy = Proxy(upstream, cache, name)
    proxy.batcher.start()
    proxies.append(proxy)
    return proxy


def _saved(model: str) -> tuple[float, float]:
    labels = {"model": model}
    tokens = REGISTRY.get_sample_value("embedpipe_upstream_tokens_saved_total", labels)
    dollars = REGISTRY.get_sample_value("embedpipe_upstream_cost_saved_dollars_total", labels)
    return tokens or 0.0, dollars or 0.0


async def test_cached_text_costs_no_call_and_counts_as_saved(proxies: list[Proxy]) -> None:
    upstream, name = FakeUpstream(dimensions=8), f"up-{uuid.uuid4().hex[:8]}"
    proxy = _open(proxies, upstream, TieredCache(MemoryTier(1 << 20), None), name)
    texts = ["hello there", "general kenobi", "hello there"]
    tokens = await proxy.service.count_tokens(name, texts)
    assert tokens == [2, 3, 2]  # cl100k
    first = await proxy.service.embed(name, texts, tokens)
    assert len(upstream.bodies) == 1 and upstream.bodies[0]["input"] == texts[:2]
    assert _saved(name) == (0.0, 0.0)  # nothing came from the cache yet
    again = await proxy.service.embed(name, texts, tokens)
    assert len(upstream.bodies) == 1 and again.sources == ["l1"] * 3
    np.testing.assert_array_equal(again.vectors, first.vectors)
    saved_tokens, saved_dollars = _saved(name)
    assert saved_tokens == 7 and saved_dollars == pytest.approx(7 * PRICE / 1e6)
    memory = proxy.service.embed_from_memory(name, texts, tokens)
    assert memory is not None and _saved(name)[0] == 14


async def test_each_size_is_asked_upstream_and_cached_apart(proxies: list[Proxy]) -> None:
    upstream, name = FakeUpstream(dimensions=8), f"up-{uuid.uuid4().hex[:8]}"
    proxy = _open(proxies, upstream, TieredCache(MemoryTier(1 << 20), None), name)
    small = await proxy.service.embed(name, ["text"], dimensions=4)
    assert small.vectors.shape == (1, 4) and upstream.bodies[-1]["dimensions"] == 4
    np.testing.assert_array_equal(small.vectors[0], vector_for("text", 4))
    full = await proxy.service.embed(name, ["text"])
    assert full.vectors.shape == (1, 8) and "dimensions" not in upstream.bodies[-1]
    assert len(upstream.bodies) == 2  # the full vector was not cut from the 4-d one
    again = proxy.service.embed_from_memory(name, ["text"], [1], dimensions=4)
    assert again is not None
    np.testing.assert_array_equal(again.vectors, small.vectors)
    assert len(upstream.bodies) == 2


async def test_a_restarted_process_serves_cached_vectors_before_any_answer(
    proxies: list[Proxy],
) -> None:
    upstream, name = FakeUpstream(dimensions=8), f"up-{uuid.uuid4().hex[:8]}"
    shared = TieredCache(MemoryTier(1 << 20), None)  # stands in for the L2 both processes use
    await _open(proxies, upstream, shared, name).service.embed(name, ["kept"])
    restarted = _open(proxies, upstream, shared, name)
    assert restarted.model.info.dimensions == 0  # it has not called the upstream yet
    result = await restarted.service.embed(name, ["kept"])
    memory = restarted.service.embed_from_memory(name, ["kept"], [1])
    assert memory is not None and len(upstream.bodies) == 1
    for vectors in (result.vectors, memory.vectors):
        np.testing.assert_array_equal(vectors[0], vector_for("kept", 8))


def test_an_input_over_the_window_is_refused_before_any_call() -> None:
    model = UpstreamModel("up", "emb-model", "http://upstream.test/v1", max_input_tokens=5)
    assert model.count_tokens(["one two three"]) == [3]
    with pytest.raises(InvalidInput) as caught:
        model.count_tokens(["short", "one two three four five six seven"])
    assert caught.value.param == "input" and "'input[1]' has 7 tokens" in caught.value.message


def test_the_cache_identity_names_url_and_model_but_never_credentials() -> None:
    def fingerprint(url: str, model: str = "text-embedding-3-small") -> str:
        return UpstreamModel("small", model, url).fingerprint

    base = fingerprint("https://api.openai.com/v1")
    assert fingerprint("https://api.openai.com/v1/") == base
    assert fingerprint("https://user:secret@api.openai.com/v1") == base
    assert fingerprint("https://other.example/v1") != base
    assert fingerprint("https://api.openai.com/v1", "text-embedding-3-large") != base
    assert public_url("https://user:secret@host:8443/v1/?key=x") == "https://host:8443/v1"
    assert UpstreamModel("small", "text-embedding-3-small", "https://x/v1").info.dimensions == 1536
