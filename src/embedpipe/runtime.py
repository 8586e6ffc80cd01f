"""The process's shared resources, built once at start-up and closed at shutdown.

``Runtime.open(settings)`` is the composition root below the CLI: it loads the models,
opens the cache, starts one batcher per model (a micro-batcher for a local model, an upstream
batcher for an ``openai``-backend one) and builds the EmbeddingService.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field

from embedpipe.batcher import Batcher, MicroBatcher
from embedpipe.cache import TieredCache, open_cache
from embedpipe.embedders import ModelRegistry, configure_threads, load_embedder, parse_model_specs
from embedpipe.inputs import TokenDecoder
from embedpipe.ratelimit import RateLimiter
from embedpipe.service import EmbeddingService
from embedpipe.settings import Settings

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

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        specs = parse_model_specs(settings.model, settings.extra_models, settings.backend)
        # A process serving only upstream models runs no model: it never loads torch.
        local = any(spec.backend != "openai" for spec in specs)
        threads = await asyncio.to_thread(configure_threads, settings.model_threads) if local else 0
        registry = ModelRegistry()
        batchers: dict[str, Batcher] = {}
        for spec in specs:
            if spec.backend == "openai":
                from embedpipe.upstream import open_upstream  # the openai SDK: ~1 s to import

                # No call (no warm-up): an upstream that is down must not keep this process
                # from becoming ready and serving its cache and its other models.
                upstream, batchers[spec.name] = open_upstream(spec, settings)
                registry.add(spec, upstream)
                continue
            embedder = await asyncio.to_thread(load_embedder, spec, settings)
            # Warm up: the first call allocates and is several times slower than the rest.
            await asyncio.to_thread(embedder.embed, ["warm up the model", "a second text"])
            registry.add(spec, embedder)
            batchers[spec.name] = MicroBatcher(embedder, settings.batching)
        log.info("serving %d model(s) with %d intra-op threads", len(registry), threads)
        cache = await open_cache(settings)
        for batcher in batchers.values():
            batcher.start()
        service = EmbeddingService(registry, batchers, cache, settings.cache)
        # What is loaded now (torch, transformers, the models: ~500k objects) lives as long as
        # the process. Frozen, the cyclic GC stops walking it in every full collection, which
        # took ~0.5 s here with every request stalled behind it.
        gc.freeze()
        return cls(
            settings=settings,
            service=service,
            default_model=specs[0].name,
            batchers=batchers,
            cache=cache,
            limiter=RateLimiter.from_settings(settings),
        )

    def start_draining(self) -> None:
        """From now on /ready answers 503 so load balancers stop sending new work.

        Called from a signal handler: only set a flag here (no logging, no locks)."""
        self.draining = True

    async def close(self) -> None:
        log.info("shutting down: stopping the batchers and closing the cache")
        self.draining = True
        for batcher in self.batchers.values():
            await batcher.stop()
        await self.cache.close()
        await self.limiter.close()

    @property
    def uptime_seconds(self) -> float:
        return time.time() - self.started_at
