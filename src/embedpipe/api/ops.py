"""Operations routes: liveness, readiness, stats, Prometheus metrics and the live dashboard."""

from __future__ import annotations

import functools
from dataclasses import asdict
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedpipe import __version__, metrics
from embedpipe.api.deps import get_runtime, json_response
from embedpipe.api.observability import TrafficWindow
from embedpipe.runtime import Runtime

router = APIRouter(tags=["Operations"])


@router.get("/health")
async def health() -> Response:
    """Liveness: 200 while the process serves."""
    return json_response({"status": "ok"})


@router.get("/ready")
async def ready(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    """Readiness: 503 while draining, or while a dependency it cannot work without (the
    broker Redis, at start) does not answer yet. A cache tier that is down, or an upstream API
    whose circuit breaker is open, makes it degraded, not 503: otherwise one Redis blip (or one
    provider outage, while the cache still serves) would pull every replica out of rotation."""
    tiers = await runtime.cache.stats()
    degraded = [tier.name for tier in tiers if not tier.healthy]
    degraded += [
        f"upstream:{info.name}"
        for info in (embedder.info for embedder in runtime.service.models)
        if info.upstream and metrics.upstream_breaker_open(info.name)
    ]
    waiting = sorted(runtime.not_ready)
    status = "degraded" if degraded else "ready"
    body = {
        "status": "draining" if runtime.draining else ("starting" if waiting else status),
        "models": [embedder.info.name for embedder in runtime.service.models],
        "degraded": degraded,
        "waiting_for": waiting,
    }
    return json_response(body, status_code=503 if runtime.draining or waiting else 200)


def _sees_everything(request: Request, runtime: Runtime) -> bool:
    """With keys on, only an admin key (``security.admin_keys``) sees paths and everyone's
    traffic; with keys off there is no one to tell apart."""
    client = getattr(request.state, "client", None)
    key = getattr(client, "key", None)
    if key is None:
        return True
    admins = {name.strip() for name in runtime.settings.security.admin_keys.split(",")}
    return str(key.name) in admins


@router.get("/stats")
async def stats(request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    """What this process is doing: models, cache tiers, queue depth, uptime, rate-limited
    requests, and its traffic of the last minutes (what ``/dashboard`` draws). With API keys,
    a key that is not an admin key sees the version and the models only (no paths, nothing
    about other keys' traffic)."""
    if not _sees_everything(request, runtime):
        return json_response(
            {
                "version": __version__,
                "models": [
                    {
                        "name": info.name,
                        "backend": info.backend,
                        "dimensions": info.dimensions,
                        "max_tokens": info.max_tokens,
                    }
                    for info in (embedder.info for embedder in runtime.service.models)
                ],
                "default_model": runtime.default_model,
            }
        )
    tiers = await runtime.cache.stats()
    traffic: TrafficWindow = request.app.state.traffic
    return json_response(
        {
            "version": __version__,
            "uptime_seconds": round(runtime.uptime_seconds, 3),
            "mode": "distributed" if runtime.settings.distributed else "embedded",
            "models": [asdict(embedder.info) for embedder in runtime.service.models],
            "default_model": runtime.default_model,
            "cache": {
                tier.name: {
                    "hits": tier.hits,
                    "misses": tier.misses,
                    "hit_ratio": round(tier.hit_ratio, 4),
                    "errors": tier.errors,
                    "entries": tier.entries,
                    "bytes": tier.bytes,
                    "healthy": tier.healthy,
                }
                for tier in tiers
            },
            "queue_depth": runtime.service.queue_depth(),
            "rate_limited": metrics.rate_limited_counts(),
            # Models served by an upstream API: its calls, the tokens it billed, and what the
            # cache saved (tokens, and dollars at EMBEDPIPE_OPENAI_PRICE_PER_MILLION_TOKENS).
            "upstream": {
                embedder.info.name: metrics.upstream_counts(embedder.info.name)
                for embedder in runtime.service.models
                if embedder.info.upstream
            },
            "traffic": traffic.snapshot(),
        }
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus text format (every worker process's samples, merged)."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


@functools.cache
def _dashboard_html() -> bytes:
    return resources.files("embedpipe.api").joinpath("static", "dashboard.html").read_bytes()


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> Response:
    """A live page that polls ``/stats``: throughput, latency, hit ratio, queue depth."""
    return Response(_dashboard_html(), media_type="text/html; charset=utf-8")
