"""Fakes that stand in for a model where the real one would only make a test slower."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx2
import numpy as np
import openai
from fastapi import FastAPI

from embedpipe.api.app import create_app
from embedpipe.batcher import MicroBatcher
from embedpipe.cache import MemoryTier, TieredCache
from embedpipe.embedders import ModelInfo, ModelRegistry, ModelSpec, Vectors
from embedpipe.embedders.base import PLAIN, TextForm
from embedpipe.embedders.prompts import ModelPrompts
from embedpipe.embedders.tokens import Truncation
from embedpipe.ratelimit import RateLimiter
from embedpipe.runtime import Runtime
from embedpipe.service import EmbeddingService
from embedpipe.settings import BatchingSettings, Settings
from embedpipe.tenancy import cache_per_tenant


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

    @property
    def prompts(self) -> ModelPrompts:
        return ModelPrompts()

    @property
    def tokenizer(self) -> None:
        return None

    def count_tokens(self, texts: Sequence[str], form: TextForm = PLAIN) -> list[int]:
        return [min(len((form.prompt + text).split()) + 2, self._info.max_tokens) for text in texts]

    def clip(self, texts: Sequence[str], truncation: Truncation = "right") -> list[str]:
        return list(texts)  # a fake's vector depends on every character

    def embed(self, texts: Sequence[str], form: TextForm = PLAIN) -> Vectors:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.calls.append(list(texts))
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("secret internal detail")
        return np.stack([vector_for(form.prompt + text, self._info.dimensions) for text in texts])


def vector_for(text: str, dimensions: int = 8) -> Vectors:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    normalized: Vectors = vector / np.linalg.norm(vector)
    return normalized


class FakeUpstream:
    """An OpenAI-compatible ``POST /embeddings`` in memory, for ``httpx2.MockTransport``:
    answers ``vector_for(text, dimensions)`` as base64, after the canned answers in
    ``script`` (a status with headers, an exception to raise, or seconds to stall before
    answering) are used up.

    ``limit(requests, window_seconds, clock)`` makes it rate limit as OpenAI does: a fixed
    window from its first request; beyond ``requests`` in it, 429 with ``retry-after-ms`` and
    ``Retry-After`` until the window ends.

    >>> upstream = FakeUpstream(dimensions=8)
    >>> upstream.script.append((429, {"retry-after-ms": "1500"}))
    >>> sdk = upstream.sdk(api_key="sk-test")
    """

    def __init__(self, dimensions: int = 8) -> None:
        self.dimensions = dimensions
        self._limit: tuple[int, float, Callable[[], float]] | None = None
        self._window: tuple[float, int] = (0.0, 0)  # (start, requests answered in it)
        self.script: list[tuple[int, dict[str, str]] | Exception | float] = []
        self.bodies: list[dict[str, Any]] = []  # every request's JSON, answered or not
        self.headers: list[dict[str, str]] = []
        self.pause: asyncio.Event | None = None  # when set, answers wait for it
        self.in_flight = 0
        self.max_in_flight = 0
        self.error_message = "upstream says no"
        self._arrived = asyncio.Condition()

    def limit(
        self, requests: int, window_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = (requests, window_seconds, clock)
        self._window = (-math.inf, 0)

    def _rate_limited(self) -> dict[str, str] | None:
        """The 429 headers when over the limit, else None (and the request is counted)."""
        if self._limit is None:
            return None
        allowed, window, clock = self._limit
        now = clock()
        start, used = self._window
        if now >= start + window:
            start, used = now, 0
        if used >= allowed:
            left = start + window - now
            return {
                "retry-after-ms": str(math.ceil(left * 1000)),
                "retry-after": str(math.ceil(left)),
            }
        self._window = (start, used + 1)
        return None

    async def wait_in_flight(self, count: int) -> None:
        """Until ``count`` requests are being answered at once."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.in_flight >= count)

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        async with self._arrived:
            self._arrived.notify_all()
        try:
            if self.pause is not None:
                await self.pause.wait()
            if self.script:
                canned = self.script.pop(0)
                if isinstance(canned, Exception):
                    raise canned
                if isinstance(canned, float):
                    await asyncio.sleep(canned)
                    return httpx2.Response(200, json=self._answer(body))
                status, headers = canned
                error = {"message": self.error_message, "type": "x", "param": None, "code": None}
                return httpx2.Response(status, json={"error": error}, headers=headers)
            limited = self._rate_limited()
            if limited is not None:
                error = {"message": "Rate limit reached", "type": "requests", "param": None}
                return httpx2.Response(429, json={"error": error}, headers=limited)
            return httpx2.Response(200, json=self._answer(body))
        finally:
            self.in_flight -= 1

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        size = body.get("dimensions", self.dimensions)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64.b64encode(
                    vector_for(text, size).astype("<f4").tobytes()
                ).decode(),
            }
            for index, text in enumerate(texts)
        ]
        tokens = sum(len(text.split()) for text in texts)
        return {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def sdk(self, api_key: str = "sk-fake") -> openai.AsyncOpenAI:
        transport = httpx2.MockTransport(self)
        return openai.AsyncOpenAI(
            api_key=api_key,
            base_url="http://upstream.test/v1",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=transport),
        )


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
        # Keys decide the cache's tenancy, as in Runtime.open.
        service=EmbeddingService(
            registry,
            {"fake": batcher},
            cache,
            settings.cache.model_copy(update={"per_tenant": cache_per_tenant(settings)}),
        ),
        default_model="fake",
        batchers={"fake": batcher},
        cache=cache,
        limiter=RateLimiter.from_settings(settings),
    )
    app = create_app(settings)
    app.state.runtime = runtime
    return app, runtime
