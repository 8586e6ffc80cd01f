"""Fakes that stand in for a model where the real one would only make a test slower."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np
from fastapi import FastAPI

from embedpipe.api.app import create_app
from embedpipe.batcher import MicroBatcher
from embedpipe.cache import MemoryTier, TieredCache
from embedpipe.embedders import ModelInfo, ModelRegistry, ModelSpec, Vectors
from embedpipe.ratelimit import RateLimiter
from embedpipe.runtime import Runtime
from embedpipe.service import EmbeddingService
from embedpipe.settings import BatchingSettings, CacheSettings, Settings


class FakeEmbedder:
    """Deterministic unit vectors from a hash of the text; records every model call.

    ``gate`` (when set) holds each call until the test releases it, to build up a queue.
    """

    def __init__(self, name: str = "fake", dimensions: int = 8, fail_on: str | None = None):
        self._info = ModelInfo(
            name=name,
            backend="fake",
            dimensions=dimensions,
            max_tokens=256,
            source="memory",
            weights_sha256=None,
        )
        self.calls: list[list[str]] = []
        self.gate: threading.Event | None = None
        self.fail_on = fail_on

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def fingerprint(self) -> str:
        return f"fake-{self._info.name}"

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [min(len(text.split()) + 2, self._info.max_tokens) for text in texts]

    def embed(self, texts: Sequence[str]) -> Vectors:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.calls.append(list(texts))
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("secret internal detail")
        return np.stack([vector_for(text, self._info.dimensions) for text in texts])


def vector_for(text: str, dimensions: int = 8) -> Vectors:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    normalized: Vectors = vector / np.linalg.norm(vector)
    return normalized


def fake_app(settings: Settings, embedder: FakeEmbedder | None = None) -> tuple[FastAPI, Runtime]:
    """The real application over a fake model named "fake" (call from a running event loop;
    no lifespan: nothing real to load). Close the runtime when done."""
    embedder = embedder or FakeEmbedder(name="fake", dimensions=8)
    registry = ModelRegistry()
    registry.add(ModelSpec(name="fake", source="memory"), embedder)
    batcher = MicroBatcher(embedder, BatchingSettings(max_wait_ms=0.0))
    batcher.start()
    cache = TieredCache(MemoryTier(1 << 20), None)
    runtime = Runtime(
        settings=settings,
        service=EmbeddingService(registry, {"fake": batcher}, cache, CacheSettings()),
        default_model="fake",
        batchers={"fake": batcher},
        cache=cache,
        limiter=RateLimiter.from_settings(settings),
    )
    app = create_app(settings)
    app.state.runtime = runtime
    return app, runtime
