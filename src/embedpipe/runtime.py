"""The process's shared resources, built once at start-up and closed at shutdown.

``Runtime.open(settings)`` is the one function that builds the core for every process kind:
the API (``api/app.py``), the Celery worker (``batches/worker.py``) and ``embedpipe embed``
(``datasets/local.py``). It loads the models, opens the cache, starts one batcher per model (a
micro-batcher for a local model, an upstream batcher for an ``openai``-backend one), builds
the rate limiter and the EmbeddingService, and registers each one's close as it opens it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial

from embedpipe import metrics
from embedpipe.batcher import Batcher, MicroBatcher
from embedpipe.cache import TieredCache, open_cache
from embedpipe.embedders import (
    Embedder,
    ModelInfo,
    ModelRegistry,
    configure_threads,
    load_embedder,
    parse_model_specs,
)
from embedpipe.embedders.pairs import pair_text
from embedpipe.embedders.registry import onnx_export_root, rerank_method
from embedpipe.heap import release_free_heap
from embedpipe.inputs import TokenDecoder
from embedpipe.quantization import Calibration, load_calibration
from embedpipe.quantization.calibration import RECORDS_DIR
from embedpipe.ratelimit import RateLimiter
from embedpipe.service import EmbeddingService
from embedpipe.settings import Settings
from embedpipe.tenancy import cache_per_tenant

log = logging.getLogger("embedpipe")


def warm_up(embedder: Embedder, max_batch_tokens: int) -> None:
    """Run the model before the process says it is ready: a first call allocates and is
    several times slower than the rest, and so is the first call of a larger shape (ONNX
    Runtime grows its memory arena then). So: two short texts, then one full call of the
    batcher's largest shape (texts at the window, up to the token budget). One text alone
    too: a lone request is the commonest call, and its kernels are other code paths (the
    first call of each pages them in)."""
    inputs = _warm_up_inputs(embedder.info)
    embedder.embed(inputs)
    embedder.embed(inputs[:1])
    if embedder.info.task == "embed":
        window = embedder.info.max_tokens
        embedder.embed(["warm up " * window] * max(1, max_batch_tokens // window))


@dataclass
class Runtime:
    settings: Settings
    service: EmbeddingService
    default_model: str
    batchers: dict[str, Batcher]
    cache: TieredCache
    limiter: RateLimiter
    token_decoder: TokenDecoder = field(default_factory=TokenDecoder)
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    # What the process still waits for before it is ready (e.g. "broker"): /ready answers 503.
    not_ready: set[str] = field(default_factory=set)

    # Every resource's close, registered as it was opened; closed last-opened first.
    resources: AsyncExitStack = field(default_factory=AsyncExitStack)

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        """Build everything; if any step fails, close what the earlier steps opened."""
        async with AsyncExitStack() as stack:
            specs = parse_model_specs(settings.model, settings.extra_models, settings.backend)
            # Options are looked up by a model's own name (not an alias): a typo would be lost.
            for name in sorted(set(settings.model_options) - {spec.name for spec in specs}):
                log.warning("EMBEDPIPE_MODEL_OPTIONS names %r, not a served model's name", name)
            # torch is loaded only for a model on the torch backend: a process serving ONNX
            # exports or upstream models never imports it.
            backends = {spec.backend for spec in specs}
            threads = 0
            if backends - {"openai"}:
                threads = await asyncio.to_thread(
                    configure_threads, settings.model_threads, torch="torch" in backends
                )
            # Opened first, closed last: batchers that are stopping still write back to it.
            cache = await open_cache(settings)
            stack.push_async_callback(cache.close)
            registry = ModelRegistry()
            batchers: dict[str, Batcher] = {}
            calibrations: dict[str, Calibration] = {}
            for spec in specs:
                batcher: Batcher
                if spec.backend == "openai":
                    from embedpipe.upstream import open_upstream  # the openai SDK: ~1 s to import

                    # No call (no warm-up): an upstream that is down must not keep this process
                    # from becoming ready and serving its cache and its other models.
                    upstream, batcher = open_upstream(spec, settings)
                    stack.push_async_callback(batcher.stop)
                    registry.add(spec, upstream)
                else:
                    embedder = await asyncio.to_thread(load_embedder, spec, settings)
                    registry.add(spec, embedder)
                    micro = MicroBatcher(embedder, settings.batching)
                    stack.push_async_callback(micro.stop)
                    # Warm up (the first calls allocate and are several times slower than the
                    # rest), then the int8 calibration: on the model's own thread, whose
                    # OpenMP threads serve every call, before the batcher starts. A
                    # cross-encoder's scores have no output types to calibrate. An ONNX
                    # model's ranges may have been made ahead, beside its exports.
                    max_tokens = settings.batching.max_batch_tokens
                    await micro.on_model_thread(warm_up, embedder, max_tokens)
                    if embedder.info.task == "embed":
                        calibrations[spec.name] = await micro.on_model_thread(
                            partial(
                                load_calibration,
                                made_ahead=onnx_export_root(settings) / RECORDS_DIR,
                            ),
                            embedder,
                            settings.data_dir,
                        )
                    batcher = micro
                batchers[spec.name] = batcher
            log.info("serving %d model(s) with %d intra-op threads", len(registry), threads)
            for batcher in batchers.values():
                batcher.start()
            limiter = RateLimiter.from_settings(settings)
            stack.push_async_callback(limiter.close)
            cache_settings = settings.cache.model_copy(
                update={"per_tenant": cache_per_tenant(settings)}
            )
            service = EmbeddingService(registry, batchers, cache, cache_settings, calibrations)
            metrics.start_at_zero(
                models=[(embedder.info.name, embedder.info.upstream) for embedder in registry],
                rerank_methods=[(model.info.name, rerank_method(model.info)) for model in registry],
                tiers=[cache.l2.name] if cache.l2 is not None else [],
            )
            # What is loaded now (the models; with torch, transformers: ~500k objects) lives as
            # long as the process. Frozen, the cyclic GC stops walking it in every full collection,
            # which took ~0.5 s here with every request stalled behind it.
            gc.freeze()
            # What loading freed (parsing, graph building, the warm-up's buffers) goes back.
            release_free_heap()
            return cls(
                settings=settings,
                service=service,
                default_model=specs[0].name,
                batchers=batchers,
                cache=cache,
                limiter=limiter,
                resources=stack.pop_all(),
            )
        raise AssertionError("unreachable")  # mypy: the block above returns or raises

    def start_draining(self) -> None:
        """From now on /ready answers 503 so load balancers stop sending new work.

        Called from a signal handler: only set a flag here (no logging, no locks)."""
        self.draining = True

    async def close(self) -> None:
        """Stop the batchers (what they hold finishes), then close the limiter and the
        cache. One failing close does not skip the others."""
        log.info("shutting down: stopping the batchers and closing the cache")
        self.draining = True
        await self.resources.aclose()

    @property
    def default_reranker(self) -> str:
        """The model of a rerank request that names none (TEI's ``/rerank``): the first
        cross-encoder served, else the default model (by cosine)."""
        rerankers = (
            model.info.name for model in self.service.models if model.info.task == "rerank"
        )
        return next(rerankers, self.default_model)

    @property
    def uptime_seconds(self) -> float:
        return time.time() - self.started_at


def _warm_up_inputs(info: ModelInfo) -> list[str]:
    if info.task == "rerank":  # a cross-encoder's inputs are (query, document) pairs
        return [pair_text("warm up", "the model"), pair_text("a second", "pair")]
    return ["warm up the model", "a second text"]
