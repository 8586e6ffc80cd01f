"""EmbeddingService: the business logic between an API and the model.

cache L1 -> cache L2 (one lookup for the whole request) -> misses deduplicated in the request
and shared across requests (single-flight) -> micro-batcher -> write-back -> usage.
It knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from embedpipe import logs, metrics
from embedpipe.batcher import MicroBatcher, PendingText
from embedpipe.cache import TieredCache, bytes_to_vector, cache_key, vector_to_bytes
from embedpipe.embedders import Embedder, ModelRegistry, Vectors
from embedpipe.settings import CacheSettings

Source = Literal["l1", "l2", "computed"]

# Tokenizing more than this many characters goes to a thread, off the event loop.
_INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True, slots=True)
class EmbedResult:
    model: str
    vectors: Vectors  # (n, dimensions) float32, L2-normalised
    sources: list[Source]
    tokens: int

    @property
    def cached_count(self) -> int:
        return sum(source != "computed" for source in self.sources)


class EmbeddingService:
    def __init__(
        self,
        models: ModelRegistry,
        batchers: dict[str, MicroBatcher],
        cache: TieredCache,
        cache_settings: CacheSettings,
    ) -> None:
        self._models = models
        self._batchers = batchers
        self._cache = cache
        self._namespace = cache_settings.namespace
        # Texts being computed right now, by cache key: later requests wait on the same work.
        self._in_flight: dict[str, PendingText] = {}

    @property
    def models(self) -> ModelRegistry:
        return self._models

    @property
    def cache(self) -> TieredCache:
        return self._cache

    def queue_depth(self) -> dict[str, int]:
        return {name: batcher.queue_depth for name, batcher in self._batchers.items()}

    def resolve_model(self, name: str) -> str:
        return self._models.resolve(name)

    async def count_tokens(self, model: str, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees them (truncated at its window, specials included):
        what ``usage`` reports and a token budget is charged. Pass them on to :meth:`embed`."""
        return await self._count_tokens(self._models.get(self._models.resolve(model)), texts)

    async def embed(
        self, model: str, texts: Sequence[str], tokens: Sequence[int] | None = None
    ) -> EmbedResult:
        """``tokens``: from :meth:`count_tokens` when the caller counted already."""
        name = self._models.resolve(model)
        embedder = self._models.get(name)
        logs.annotate(model=name, inputs=len(texts))  # the request's access log line
        if tokens is None:
            tokens = await self._count_tokens(embedder, texts)
        elif len(tokens) != len(texts):
            raise ValueError("one token count per text is needed")

        unique: dict[str, int] = {}  # text -> index into the unique lists
        for text in texts:
            unique.setdefault(text, len(unique))
        unique_texts = list(unique)
        keys = [cache_key(self._namespace, embedder.fingerprint, text) for text in unique_texts]
        found = await self._cache.get_many(keys)

        vectors = np.empty((len(unique_texts), embedder.info.dimensions), dtype=np.float32)
        sources: list[Source] = ["computed"] * len(unique_texts)
        missing: list[int] = []
        for position, hit in enumerate(found):
            if hit is None:
                missing.append(position)
            else:
                vectors[position] = bytes_to_vector(hit[0])
                sources[position] = hit[1]
        if missing:
            token_of = dict(zip(texts, tokens, strict=True))
            computed = await self._compute(
                name,
                [keys[position] for position in missing],
                [unique_texts[position] for position in missing],
                [token_of[unique_texts[position]] for position in missing],
            )
            for position, vector in zip(missing, computed, strict=True):
                vectors[position] = vector

        order = [unique[text] for text in texts]
        matrix = vectors if len(order) == len(unique_texts) else vectors[order]
        served_sources = [sources[position] for position in order]
        for source in ("l1", "l2", "computed"):
            count = served_sources.count(source)
            if count:
                metrics.EMBEDDINGS.labels(model=name, source=source).inc(count)
        total_tokens = sum(tokens)
        metrics.TOKENS.labels(model=name).inc(total_tokens)
        logs.annotate(cache_hits=len(texts) - served_sources.count("computed"), tokens=total_tokens)
        return EmbedResult(model=name, vectors=matrix, sources=served_sources, tokens=total_tokens)

    async def _count_tokens(self, embedder: Embedder, texts: Sequence[str]) -> list[int]:
        if sum(map(len, texts)) <= _INLINE_TOKENIZE_CHARS:
            return embedder.count_tokens(texts)
        return await asyncio.to_thread(embedder.count_tokens, texts)

    async def _compute(
        self, model: str, keys: list[str], texts: list[str], tokens: list[int]
    ) -> list[np.ndarray]:
        """Vectors for cache misses: join work already in flight, queue the rest as one unit."""
        waiting: list[PendingText] = []
        new_keys: list[str] = []
        new_texts: list[str] = []
        new_tokens: list[int] = []
        slots: list[int] = []  # position in `waiting` of each key
        for key, text, count in zip(keys, texts, tokens, strict=True):
            shared = self._in_flight.get(key)
            if shared is not None and not shared.future.done():
                shared.join()
                slots.append(len(waiting))
                waiting.append(shared)
            else:
                slots.append(-1 - len(new_keys))
                new_keys.append(key)
                new_texts.append(text)
                new_tokens.append(count)
        created = self._batchers[model].submit(new_texts, new_tokens) if new_keys else []
        for key, item in zip(new_keys, created, strict=True):
            self._in_flight[key] = item
            item.future.add_done_callback(functools.partial(self._forget, key, item))
        ordered = [waiting[slot] if slot >= 0 else created[-1 - slot] for slot in slots]
        try:
            # shield: one request going away must not cancel work others wait for.
            results = await asyncio.gather(*(asyncio.shield(item.future) for item in ordered))
        except BaseException:
            for item in ordered:
                item.leave()
            raise
        if created:
            await self._cache.set_many(
                {
                    key: vector_to_bytes(item.future.result())
                    for key, item in zip(new_keys, created, strict=True)
                }
            )
        return list(results)

    def _forget(self, key: str, item: PendingText, _: object) -> None:
        if self._in_flight.get(key) is item:
            del self._in_flight[key]
