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

from embedpipe import metrics
from embedpipe.batcher import Batcher, MicroBatcher
from embedpipe.cache import TieredCache, open_cache
from embedpipe.embedders import ModelRegistry, configure_threads, load_embedder, parse_model_specs
from embedpipe.inputs import TokenDecoder
from embedpipe.ratelimit import RateLimiter
from embedpipe.service import EmbeddingService
from embedpipe.settings import Settings
from embedpipe.tenancy import cache_per_tenant

log = logging.getLogger("embedpipe")


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
            # A process serving only upstream models runs no model: it never loads torch.
            local = any(spec.backend != "openai" for spec in specs)
            threads = (
                await asyncio.to_thread(configure_threads, settings.model_threads) if local else 0
            )
            # Opened first, closed last: batchers that are stopping still write back to it.
            cache = await open_cache(settings)
            stack.push_async_callback(cache.close)
            registry = ModelRegistry()
            batchers: dict[str, Batcher] = {}
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
                    # Warm up: the first call allocates and is several times slower than the
                    # rest. On the model's own thread, whose OpenMP threads serve every call.
                    await micro.warm_up(["warm up the model", "a second text"])
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
            service = EmbeddingService(registry, batchers, cache, cache_settings)
            metrics.start_at_zero(
                models=[(embedder.info.name, embedder.info.upstream) for embedder in registry],
                tiers=[cache.l2.name] if cache.l2 is not None else [],
            )
            # What is loaded now (torch, transformers, the models: ~500k objects) lives as long
            # as the process. Frozen, the cyclic GC stops walking it in every full collection,
            # which took ~0.5 s here with every request stalled behind it.
            gc.freeze()
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
    def uptime_seconds(self) -> float:
        return time.time() - self.started_at
