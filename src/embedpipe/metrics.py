"""Prometheus metric definitions (the one module-level exception: a registry rejects duplicates).

Names use the ``embedpipe_`` prefix and base units; every label set is bounded (routes are
route templates, models are the configured ones, statuses are HTTP codes).

Several worker processes (``embedpipe serve --workers N``): the CLI points
``PROMETHEUS_MULTIPROC_DIR`` at an emptied folder *before* this module is imported, every
process then writes its samples there, and :func:`exposition` merges them. Each gauge says
how its per-process values combine (``multiprocess_mode``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

# `*_created` series double the series count and no query here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# 1 ms to 10 s: an embedding request is a few ms from the cache and seconds for a big batch.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# --- HTTP (recorded by embedpipe.api.observability) ---
HTTP_REQUESTS = Counter(
    "embedpipe_http_requests",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_IN_FLIGHT = Gauge(
    "embedpipe_http_requests_in_flight",
    "Work requests (not probes or scrapes) being answered now; a drain waits for these.",
    multiprocess_mode="livesum",
)
HTTP_DURATION = Histogram(
    "embedpipe_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10),
)

# --- the service, cache and batcher ---
EMBEDDINGS = Counter(
    "embedpipe_embeddings",
    "Embeddings served, by where the vector came from: l1, l2, shared (joined a computation "
    "already in flight for another request) or computed. Saved work = l1 + l2 + shared.",
    ["model", "source"],
)
EMBEDDING_OUTPUTS = Counter(
    "embedpipe_embedding_outputs",
    "Vectors written in answers, by model and output type (embedding_type; Cohere's float "
    "and base64 count as float32): one per text and asked type.",
    ["model", "type"],
)
RERANK_DOCUMENTS = Counter(
    "embedpipe_rerank_documents",
    "Documents ranked, by model and method: cross-encoder (each pair scored, cached like an "
    "embedding under embedpipe_embeddings_total's sources) or cosine (an embedding model's "
    "vectors).",
    ["model", "method"],
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
    multiprocess_mode="livemax",
)
CACHE_WRITES_PENDING = Gauge(
    "embedpipe_cache_writes_pending",
    "Entries on their way to the cache tier (l2) behind answers already given.",
    ["tier"],
    multiprocess_mode="livesum",
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
    buckets=_SECONDS,
)
QUEUE_DEPTH = Gauge(
    "embedpipe_queue_depth",
    "Texts waiting for the model (summed over worker processes).",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUE_CAPACITY = Gauge(
    "embedpipe_queue_capacity",
    "Texts that may wait for the model before requests get 503 (summed over worker processes).",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "embedpipe_queue_wait_seconds",
    "Time a text waited in the queue before its model call started.",
    ["model"],
    buckets=(0.0005, *_SECONDS),
)

# --- the upstream API of ``openai``-backend models (wired by embedpipe.upstream) ---
UPSTREAM_REQUESTS = Counter(
    "embedpipe_upstream_requests",
    "HTTP attempts to the upstream API, by status code (or connection_error, timeout).",
    ["model", "status"],
)
UPSTREAM_TOKENS = Counter(
    "embedpipe_upstream_tokens",
    "Input tokens the upstream API billed (its usage; our cl100k count when it reports none).",
    ["model"],
)
UPSTREAM_TOKENS_SAVED = Counter(
    "embedpipe_upstream_tokens_saved",
    "Input tokens served from the cache instead of the upstream API (cl100k).",
    ["model"],
)
UPSTREAM_COST_SAVED = Counter(
    "embedpipe_upstream_cost_saved_dollars",
    "Estimated upstream cost the cache saved: tokens saved x the configured price.",
    ["model"],
)
UPSTREAM_RETRIES = Counter(
    "embedpipe_upstream_retries",
    "Upstream attempts repeated after a 429, 5xx, timeout or refused connection.",
    ["model"],
)
UPSTREAM_SECONDS = Histogram(
    "embedpipe_upstream_request_duration_seconds",
    "Time of one HTTP attempt to the upstream API.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPSTREAM_BREAKER_OPEN = Gauge(
    "embedpipe_upstream_breaker_open",
    "1 while the circuit breaker of an upstream model is open (calls fail fast with 503).",
    ["model"],
    multiprocess_mode="livemax",
)

# --- protection (wired by the rate limiter) ---
RATE_LIMITED = Counter(
    "embedpipe_rate_limited",
    "Requests refused with 429, by the limit that refused them (requests or tokens).",
    ["limit"],
)
RATE_LIMITER_ERRORS = Counter(
    "embedpipe_rate_limiter_errors",
    "Rate-limit decisions taken without the limiter's storage (it failed or is skipped).",
)

# --- batch jobs (wired by the job runner) ---
JOBS = Counter(
    "embedpipe_jobs",
    "Batch jobs that reached a final status (completed, failed, cancelled, expired).",
    ["status"],
)
JOBS_SUBMITTED = Counter("embedpipe_jobs_submitted", "Batch jobs accepted.")
JOB_ITEMS = Counter(
    "embedpipe_job_items",
    "Requests (lines) of batch jobs processed, by outcome (succeeded, failed or expired).",
    ["status"],
)
JOB_CHUNK_SECONDS = Histogram(
    "embedpipe_job_chunk_duration_seconds",
    "Time to process one chunk of a batch job.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)

# --- what is running ---
BUILD_INFO = Gauge(
    "embedpipe_build_info",
    "Always 1; the labels say which embedpipe and Python serve.",
    ["version", "python"],
    multiprocess_mode="livemax",
)
MODEL_INFO = Gauge(
    "embedpipe_model_info",
    "Always 1 per served model; the labels describe it.",
    ["model", "backend", "dimensions", "max_tokens", "weights_sha256"],
    multiprocess_mode="livemax",
)


# Label values known in advance, exported at 0 from the start (Prometheus' "avoid missing
# metrics"): a series that appears only at its first event leaves rate(), alerts and panels
# with nothing to work on.
SOURCES = ("l1", "l2", "shared", "computed")
# embedpipe.quantization.EMBEDDING_TYPES (a test keeps them equal; this module imports nothing).
OUTPUT_TYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
JOB_STATUSES = ("completed", "failed", "cancelled", "expired")
JOB_ITEM_STATUSES = ("succeeded", "failed", "expired")


def start_at_zero(
    *,
    models: Iterable[tuple[str, bool]] = (),
    rerank_methods: Iterable[tuple[str, str]] = (),
    tiers: Iterable[str] = (),
    limits: Iterable[str] = (),
    jobs: bool = False,
) -> None:
    """Create the series of what this process serves, at 0: ``models`` as (name, is it an
    upstream model), each model's ``rerank_methods`` as (name, cross-encoder | cosine), the
    cache ``tiers`` configured, the rate ``limits`` in force (requests,
    tokens), and, with ``jobs``, the batch job statuses."""
    for name, upstream in models:
        for source in SOURCES:
            EMBEDDINGS.labels(model=name, source=source)
        for output_type in OUTPUT_TYPES:
            EMBEDDING_OUTPUTS.labels(model=name, type=output_type)
        for family in (TOKENS, BATCH_SIZE, BATCH_TOKENS, INFERENCE_SECONDS, QUEUE_WAIT):
            family.labels(model=name)
        QUEUE_DEPTH.labels(model=name)
        if upstream:
            UPSTREAM_REQUESTS.labels(model=name, status="200")
            for upstream_family in (
                UPSTREAM_TOKENS,
                UPSTREAM_TOKENS_SAVED,
                UPSTREAM_COST_SAVED,
                UPSTREAM_RETRIES,
                UPSTREAM_SECONDS,
                UPSTREAM_BREAKER_OPEN,
            ):
                upstream_family.labels(model=name)
    for name, method in rerank_methods:
        RERANK_DOCUMENTS.labels(model=name, method=method)
    for tier in tiers:
        CACHE_ERRORS.labels(tier=tier)
        CACHE_BREAKER_OPEN.labels(tier=tier)
    for limit in limits:
        RATE_LIMITED.labels(limit=limit)
    if jobs:
        for status in JOB_STATUSES:
            JOBS.labels(status=status)
        for status in JOB_ITEM_STATUSES:
            JOB_ITEMS.labels(status=status)


def describe_process(version: str, models: Iterable[tuple[str, str, int, int, str]]) -> None:
    """Set the info gauges: ``models`` holds (name, backend, dimensions, max tokens, sha256)."""
    BUILD_INFO.labels(version=version, python=platform.python_version()).set(1)
    for name, backend, dimensions, max_tokens, sha256 in models:
        MODEL_INFO.labels(
            model=name,
            backend=backend,
            dimensions=str(dimensions),
            max_tokens=str(max_tokens),
            weights_sha256=sha256[:12],
        ).set(1)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_DIR_ENV) or None


def exposition() -> tuple[bytes, str]:
    """The text format for ``/metrics``: this process's registry, or every worker's merged."""
    if multiprocess_dir() is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_exposition(host: str, port: int) -> None:
    """Serve ``/metrics`` on its own port from a daemon thread: a Celery worker has no HTTP
    server of its own, yet its job metrics must reach Prometheus."""
    if multiprocess_dir() is None:
        start_http_server(port, addr=host, registry=REGISTRY)
        return
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def process_exiting() -> None:
    """Drop this process's live gauges (queue depth, info) from the merged view."""
    if multiprocess_dir() is not None:
        _multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def upstream_counts(model: str) -> dict[str, object]:
    """This process's upstream calls, tokens and savings for one model, for ``/stats``."""
    requests: dict[str, int] = {}
    for family in UPSTREAM_REQUESTS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["model"] == model:
                requests[sample.labels["status"]] = int(sample.value)

    def total(counter: Counter) -> float:
        return sum(
            sample.value
            for family in counter.collect()
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["model"] == model
        )

    return {
        "breaker_open": upstream_breaker_open(model),
        "requests": requests,
        "retries": int(total(UPSTREAM_RETRIES)),
        "tokens": int(total(UPSTREAM_TOKENS)),
        "tokens_saved": int(total(UPSTREAM_TOKENS_SAVED)),
        "cost_saved_dollars": round(total(UPSTREAM_COST_SAVED), 6),
    }


def upstream_breaker_open(model: str) -> bool:
    """Whether this process's circuit breaker for an upstream model is open."""
    return any(
        sample.value >= 1
        for family in UPSTREAM_BREAKER_OPEN.collect()
        for sample in family.samples
        if sample.labels["model"] == model
    )


def record_upstream_savings(model: str, tokens: int, price_per_million_tokens: float) -> None:
    """Tokens served from the cache for an upstream model: what its API did not bill."""
    if tokens > 0:
        UPSTREAM_TOKENS_SAVED.labels(model=model).inc(tokens)
        UPSTREAM_COST_SAVED.labels(model=model).inc(tokens * price_per_million_tokens / 1e6)


def rate_limited_counts() -> dict[str, int]:
    """Requests refused per limit by this process, for ``/stats``."""
    return {
        sample.labels["limit"]: int(sample.value)
        for family in RATE_LIMITED.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }
