"""EmbeddingService: the business logic between an API and the model.

cache L1 -> cache L2 (one lookup for the whole request) -> misses deduplicated in the request
and shared across requests (single-flight) -> micro-batcher -> write-back -> usage.
It knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from embedpipe import logs, metrics
from embedpipe.batcher import Batcher, PendingText
from embedpipe.cache import TieredCache, VectorCodec, cache_key
from embedpipe.embedders import ModelInfo, ModelRegistry, ServedModel, Vectors
from embedpipe.embedders.base import PLAIN, TextForm
from embedpipe.embedders.tokens import Truncation
from embedpipe.quantization import Calibration, ServedRows
from embedpipe.settings import CacheSettings
from embedpipe.tenancy import current_tenant, tenant_namespace

# shared: joined a computation already in flight for another request (single-flight); like
# a cache hit it is work saved, but it was never in a cache.
Source = Literal["l1", "l2", "shared", "computed"]

# Tokenizing more than this many characters goes to a thread, off the event loop.
_INLINE_TOKENIZE_CHARS = 4096
# Texts are tokenized in groups of about this many characters: the tokenizer holds ~80 bytes
# per character while it works, so a request's peak stays near 20 MB whatever its size.
_TOKENIZE_GROUP_CHARS = 256 * 1024


@dataclass(frozen=True, slots=True)
class EmbedResult:
    model: str
    vectors: Vectors  # (n, dimensions) float32, L2-normalised
    sources: list[Source]
    tokens: int

    @property
    def cached_count(self) -> int:
        """Texts served from a cache tier (a shared computation is saved work, not a hit)."""
        return sum(source in ("l1", "l2") for source in self.sources)


class EmbeddingService:
    def __init__(
        self,
        models: ModelRegistry,
        batchers: Mapping[str, Batcher],
        cache: TieredCache,
        cache_settings: CacheSettings,
        calibrations: Mapping[str, Calibration] | None = None,
    ) -> None:
        self._models = models
        # int8/uint8 ranges per local model (by canonical name); upstream models have none.
        self._calibrations = dict(calibrations or {})
        self._batchers = batchers
        self._cache = cache
        self._namespace = cache_settings.namespace
        self._per_tenant = bool(cache_settings.per_tenant)
        self._codec = VectorCodec(cache_settings.store_dtype)
        # A cross-encoder's score is stored exactly: float16 would move it by ~1e-3.
        self._exact = VectorCodec("float32")
        # int8 and binary rows served lately: a cache hit's row is not quantised again.
        self._served_rows = ServedRows()
        # Texts being computed right now, by cache key: later requests wait on the same work.
        self._in_flight: dict[str, PendingText] = {}

    @property
    def models(self) -> ModelRegistry:
        return self._models

    @property
    def served_rows(self) -> ServedRows:
        """Compact rows served lately (the event loop's: pass it to ``served_as``)."""
        return self._served_rows

    @property
    def cache(self) -> TieredCache:
        return self._cache

    def queue_depth(self) -> dict[str, int]:
        return {name: batcher.queue_depth for name, batcher in self._batchers.items()}

    def resolve_model(self, name: str, route: str | None = None) -> str:
        """The canonical name (ModelNotFound otherwise); with ``route``, InvalidInput when the
        model does not serve that route (a cross-encoder serves no embeddings)."""
        if route is None:
            return self._models.resolve(name)
        return self._models.resolve_for(name, route)

    def calibration(self, model: str) -> Calibration | None:
        """The model's int8/uint8 calibration; None for a model without one."""
        return self._calibrations.get(self._models.resolve(model))

    async def clip(
        self, model: str, texts: Sequence[str], truncation: Truncation = "right"
    ) -> list[str]:
        """The texts cut where the model's window ends (its start, for ``left``: same tokens,
        same vectors): call it before :meth:`count_tokens` and :meth:`embed`, so that no step
        downstream costs more for a text longer than the window. Long texts are cut on a
        thread."""
        embedder = self._models.get(self._models.resolve(model))
        if sum(map(len, texts)) <= _INLINE_TOKENIZE_CHARS:
            return embedder.clip(texts, truncation)
        return await asyncio.to_thread(embedder.clip, texts, truncation)

    async def count_tokens(
        self, model: str, texts: Sequence[str], form: TextForm = PLAIN
    ) -> list[int]:
        """Tokens per text as the model sees them (truncated at its window, specials included):
        what ``usage`` reports and a token budget is charged. Pass them on to :meth:`embed`.

        Texts whose vector is in L1 have their count there: only the others are tokenised."""
        embedder = self._models.get(self._models.resolve(model))
        known: list[int | None] = []
        for key in self._keys(embedder, texts, form=form):
            entry = self._cache.l1.peek(key)
            known.append(None if entry is None else entry[1])
        unknown = [text for text, count in zip(texts, known, strict=True) if count is None]
        fresh = iter(await self._count_tokens(embedder, unknown, form) if unknown else [])
        return [next(fresh) if count is None else count for count in known]

    def embed_from_memory(
        self,
        model: str,
        texts: Sequence[str],
        tokens: Sequence[int],
        *,
        dimensions: int | None = None,
        form: TextForm = PLAIN,
    ) -> EmbedResult | None:
        """The answer when every text is in L1, without awaiting anything; else None (and
        nothing counted): then call :meth:`embed`. The request path tries this first, so a
        hit costs no task, no thread and no tokenizer."""
        name = self._models.resolve(model)
        embedder = self._models.get(name)
        sized = _sized(embedder.info, dimensions)
        unique: dict[str, int] = {}
        for text in texts:
            unique.setdefault(text, len(unique))
        values = self._cache.l1.get_all(self._keys(embedder, unique, sized, form))
        if values is None:
            return None
        logs.annotate(model=name, inputs=len(texts))
        width = self._width(embedder.info, sized, values)
        vectors = np.empty((len(values), width), dtype=np.float32)
        codec = self._codec_of(embedder.info)
        for position, value in enumerate(values):
            vectors[position] = codec.decode(value)
        return self._served(name, texts, unique, vectors, ["l1"] * len(values), tokens)

    async def embed(
        self,
        model: str,
        texts: Sequence[str],
        tokens: Sequence[int] | None = None,
        *,
        dimensions: int | None = None,
        background: bool = False,
        form: TextForm = PLAIN,
        durable: bool = False,
    ) -> EmbedResult:
        """``tokens``: from :meth:`count_tokens` (in the same ``form``) when the caller
        counted already. ``form``: the prompt kept apart and the truncation side.
        ``dimensions``: the size asked for (already checked). A local model's full vector is
        cached and cut to size later; an upstream model computes each size itself, so each
        size is its own cache entry and comes back that size. ``background``: a batch job's
        texts, which the model computes only while no online text waits. An online answer
        does not wait for its L2 write; a background or ``durable`` one does (a dataset chunk
        is committed with its vectors in the cache, even if the process dies next)."""
        name = self._models.resolve(model)
        embedder = self._models.get(name)
        sized = _sized(embedder.info, dimensions)
        logs.annotate(model=name, inputs=len(texts))  # the request's access log line
        # Announced until the lookup ends: a batch may wait for these misses. No await comes
        # between the lookup's end and the submit in _compute, so no batch leaves in between.
        with self._batchers[name].on_the_way():
            if tokens is None:
                texts = await self.clip(name, texts, form.truncation)
                tokens = await self._count_tokens(embedder, texts, form)
            elif len(tokens) != len(texts):
                raise ValueError("one token count per text is needed")
            unique: dict[str, int] = {}  # text -> index into the unique lists
            for text in texts:
                unique.setdefault(text, len(unique))
            unique_texts = list(unique)
            keys = self._keys(embedder, unique_texts, sized, form)
            token_of = dict(zip(texts, tokens, strict=True))
            found = await self._cache.get_many(keys, [token_of[text] for text in unique_texts])

        width = self._width(embedder.info, sized, (hit[0] for hit in found if hit is not None))
        vectors = np.empty((len(unique_texts), width), dtype=np.float32)
        sources: list[Source] = ["computed"] * len(unique_texts)
        missing: list[int] = []
        for position, hit in enumerate(found):
            vector = self._decoded(hit[0], width, embedder.info) if hit is not None else None
            if hit is None or vector is None:
                missing.append(position)
            else:
                vectors[position] = vector
                sources[position] = hit[1]
        if missing:
            computed, joined = await self._compute(
                name,
                [keys[position] for position in missing],
                [unique_texts[position] for position in missing],
                [token_of[unique_texts[position]] for position in missing],
                sized,
                background,
                form,
                wait_for_l2=background or durable,
            )
            if not width:  # nothing was cached: an upstream model's first answer sizes it
                vectors = np.empty((len(unique_texts), len(computed[0])), dtype=np.float32)
            for position, vector, shared in zip(missing, computed, joined, strict=True):
                # As a later hit will decode it: every answer for a text is the same.
                vectors[position] = self._codec_of(embedder.info).round_trip(vector)
                if shared:
                    sources[position] = "shared"
        return self._served(name, texts, unique, vectors, sources, tokens)

    def _keys(
        self,
        embedder: ServedModel,
        texts: Iterable[str],
        sized: int | None = None,
        form: TextForm = PLAIN,
    ) -> list[str]:
        identity = embedder.fingerprint + form.key_suffix
        if sized is not None:
            identity += f"-d{sized}"
        fingerprint = self._codec_of(embedder.info).fingerprint(identity)
        namespace = self._namespace
        if self._per_tenant:
            namespace = tenant_namespace(namespace, current_tenant())
        return [cache_key(namespace, fingerprint, text) for text in texts]

    def _codec_of(self, info: ModelInfo) -> VectorCodec:
        return self._exact if info.task == "rerank" else self._codec

    def _decoded(self, value: bytes, width: int, info: ModelInfo) -> Vectors | None:
        """A cached vector, or None (a miss, recomputed) when the bytes are not one vector of
        this width: a corrupt or foreign entry is never served."""
        try:
            vector = self._codec_of(info).decode(value)
        except ValueError:
            return None
        return vector if len(vector) == width else None

    def _width(self, info: ModelInfo, sized: int | None, values: Iterable[bytes]) -> int:
        """Columns of the answer: the size asked of an upstream model, else the model's size,
        else (an upstream model that has not answered yet in this process) a cached vector's;
        0 when none is at hand."""
        if sized or info.dimensions:
            return sized or info.dimensions
        return next((len(self._codec_of(info).decode(value)) for value in values), 0)

    def _served(
        self,
        name: str,
        texts: Sequence[str],
        unique: dict[str, int],
        vectors: Vectors,
        sources: list[Source],
        tokens: Sequence[int],
    ) -> EmbedResult:
        """The result in request order (duplicates expanded), counted in the metrics."""
        order = [unique[text] for text in texts]
        matrix = vectors if len(order) == len(unique) else vectors[order]
        served_sources = [sources[position] for position in order]
        for source in ("l1", "l2", "shared", "computed"):
            count = served_sources.count(source)
            if count:
                metrics.EMBEDDINGS.labels(model=name, source=source).inc(count)
        total_tokens = sum(tokens)
        metrics.TOKENS.labels(model=name).inc(total_tokens)
        info = self._models.get(name).info
        if info.upstream:
            saved = sum(
                n for n, source in zip(tokens, served_sources, strict=True) if source != "computed"
            )
            metrics.record_upstream_savings(name, saved, info.price_per_million_tokens)
        hits = sum(source in ("l1", "l2") for source in served_sources)
        shared = served_sources.count("shared")
        logs.annotate(
            cache_hits=hits, **({"shared": shared} if shared else {}), tokens=total_tokens
        )
        return EmbedResult(model=name, vectors=matrix, sources=served_sources, tokens=total_tokens)

    async def _count_tokens(
        self, embedder: ServedModel, texts: Sequence[str], form: TextForm = PLAIN
    ) -> list[int]:
        if sum(map(len, texts)) <= _INLINE_TOKENIZE_CHARS:
            return embedder.count_tokens(texts, form)
        return await asyncio.to_thread(_count_in_groups, embedder, texts, form)

    async def _compute(
        self,
        model: str,
        keys: list[str],
        texts: list[str],
        tokens: list[int],
        sized: int | None = None,
        background: bool = False,
        form: TextForm = PLAIN,
        wait_for_l2: bool = False,
    ) -> tuple[list[np.ndarray], list[bool]]:
        """Vectors for cache misses: join work already in flight, queue the rest as one unit.
        Also, per text, whether it joined work in flight (then it counts as ``shared``)."""
        waiting: list[PendingText] = []
        new_keys: list[str] = []
        new_texts: list[str] = []
        new_tokens: list[int] = []
        slots: list[int] = []  # position in `waiting` of each key
        for key, text, count in zip(keys, texts, tokens, strict=True):
            shared = self._in_flight.get(key)
            if shared is not None and not shared.future.done():
                shared.join()
                shared.background = shared.background and background
                slots.append(len(waiting))
                waiting.append(shared)
            else:
                slots.append(-1 - len(new_keys))
                new_keys.append(key)
                new_texts.append(text)
                new_tokens.append(count)
        batcher = self._batchers[model]
        created = (
            batcher.submit(new_texts, new_tokens, sized, background=background, form=form)
            if new_keys
            else []
        )
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
            codec = self._codec_of(self._models.get(model).info)
            await self._cache.set_many(
                {
                    key: codec.encode(item.future.result())
                    for key, item in zip(new_keys, created, strict=True)
                },
                tokens=dict(zip(new_keys, new_tokens, strict=True)),
                # An online answer does not wait for L2 (in L1 already); batch work does, so
                # that its writes never outrun the tier nor die with the process unwritten.
                wait=wait_for_l2,
            )
        return list(results), [slot >= 0 for slot in slots]

    def _forget(self, key: str, item: PendingText, _: object) -> None:
        if self._in_flight.get(key) is item:
            del self._in_flight[key]


def _sized(info: ModelInfo, dimensions: int | None) -> int | None:
    """The size an upstream model must compute; None for a local model (cut after the cache)."""
    return dimensions if info.upstream else None


def _count_in_groups(embedder: ServedModel, texts: Sequence[str], form: TextForm) -> list[int]:
    counts: list[int] = []
    start = size = 0
    for end, text in enumerate(texts):
        if size and size + len(text) > _TOKENIZE_GROUP_CHARS:
            counts += embedder.count_tokens(texts[start:end], form)
            start, size = end, 0
        size += len(text)
    return counts + embedder.count_tokens(texts[start:], form)
