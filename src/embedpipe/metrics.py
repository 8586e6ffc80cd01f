"""Prometheus metric definitions (the one module-level exception: a registry rejects duplicates).

Names use the ``embedpipe_`` prefix and base units; every label set is bounded.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EMBEDDINGS = Counter(
    "embedpipe_embeddings",
    "Embeddings served, by where the vector came from (l1, l2 or computed).",
    ["model", "source"],
)
CACHE_ERRORS = Counter(
    "embedpipe_cache_errors",
    "Cache operations that failed or were skipped by an open circuit breaker.",
    ["tier"],
)
CACHE_BREAKER_OPEN = Gauge(
    "embedpipe_cache_breaker_open",
    "1 while the circuit breaker of a cache tier is open.",
    ["tier"],
)
TOKENS = Counter("embedpipe_tokens", "Tokens of the inputs served.", ["model"])
BATCH_SIZE = Histogram(
    "embedpipe_batch_size",
    "Texts per model call.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_TOKENS = Histogram(
    "embedpipe_batch_tokens",
    "Padded tokens per model call (batch size x longest text).",
    ["model"],
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
)
INFERENCE_SECONDS = Histogram(
    "embedpipe_inference_duration_seconds",
    "Time of one model call.",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_DEPTH = Gauge("embedpipe_queue_depth", "Texts waiting for the model.", ["model"])
QUEUE_WAIT = Histogram(
    "embedpipe_queue_wait_seconds",
    "Time a text waited in the queue before its model call started.",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
