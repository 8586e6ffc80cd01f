"""The process's shared resources, built once at start-up and closed at shutdown.

``Runtime.open(settings)`` is the composition root below the CLI: it loads the models,
opens the cache, starts one micro-batcher per model and builds the EmbeddingService.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from embedpipe.batcher import MicroBatcher
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
    batchers: dict[str, MicroBatcher]
    cache: TieredCache
    limiter: RateLimiter
    token_decoder: TokenDecoder = field(default_factory=TokenDecoder)
    started_at: float = field(default_factory=time.time)
    draining: bool = False

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        specs = parse_model_specs(settings.model, settings.extra_models, settings.backend)
        threads = await asyncio.to_thread(configure_threads, settings.model_threads)
        registry = ModelRegistry()
        for spec in specs:
            embedder = await asyncio.to_thread(load_embedder, spec)
            # Warm up: the first call allocates and is several times slower than the rest.
            await asyncio.to_thread(embedder.embed, ["warm up the model", "a second text"])
            registry.add(spec, embedder)
        log.info("serving %d model(s) with %d intra-op threads", len(registry), threads)
        cache = await open_cache(settings)
        batchers = {
            embedder.info.name: MicroBatcher(embedder, settings.batching) for embedder in registry
        }
        for batcher in batchers.values():
            batcher.start()
        service = EmbeddingService(registry, batchers, cache, settings.cache)
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
