"""Operations routes: liveness, readiness, stats and Prometheus metrics."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.responses import Response

from embedpipe import __version__
from embedpipe.api.deps import get_runtime, json_response
from embedpipe.runtime import Runtime

router = APIRouter(tags=["Operations"])


@router.get("/health")
async def health() -> Response:
    """Liveness: 200 while the process serves."""
    return json_response({"status": "ok"})


@router.get("/ready")
async def ready(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    """Readiness: 503 while draining. A cache tier that is down makes it degraded, not 503:
    otherwise one Redis blip would pull every replica out of rotation."""
    tiers = await runtime.cache.stats()
    degraded = [tier.name for tier in tiers if not tier.healthy]
    body = {
        "status": "draining" if runtime.draining else ("degraded" if degraded else "ready"),
        "models": [embedder.info.name for embedder in runtime.service.models],
        "degraded": degraded,
    }
    return json_response(body, status_code=503 if runtime.draining else 200)


@router.get("/stats")
async def stats(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    """What the process is doing: models, cache tiers, queue depth, uptime."""
    tiers = await runtime.cache.stats()
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
        }
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus text format."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
