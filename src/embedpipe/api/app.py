"""``create_app(settings)``: the FastAPI application, its lifespan and its routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from starlette.responses import Response

from embedpipe import __version__
from embedpipe.api import files_batches, openai, ops, simple, tokenize
from embedpipe.api.cohere_errors import COHERE_PATHS, CohereErrorMiddleware
from embedpipe.api.deps import ClientGone
from embedpipe.api.docs import install_docs
from embedpipe.api.draining import DrainingMiddleware, draining_of, on_shutdown_signal
from embedpipe.api.errors import install_error_handlers
from embedpipe.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from embedpipe.api.observability import (
    ObservabilityMiddleware,
    TrafficWindow,
    on_shutdown,
    on_startup,
)
from embedpipe.api.openapi import install_openapi
from embedpipe.api.request_guard import (
    CrossSiteGuardMiddleware,
    HostGuardMiddleware,
    HostRule,
    allowed_hosts,
)
from embedpipe.api.security import install_security
from embedpipe.batches.resume import ResumeWhenReachable
from embedpipe.batches.wiring import open_job_service
from embedpipe.runtime import Runtime
from embedpipe.settings import Settings


def _client_gone(_: Request, __: Exception) -> Response:
    # Nobody reads this; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


def create_app(settings: Settings) -> FastAPI:
    traffic = TrafficWindow()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each resource's close is registered as it opens: a failing step (the job store, say)
        # still closes the models, batchers and cache opened before it, and one failing
        # close does not skip the others.
        async with AsyncExitStack() as resources:
            resources.callback(on_shutdown)  # runs last
            runtime = await Runtime.open(settings)
            resources.push_async_callback(runtime.close)
            jobs = await open_job_service(settings, runtime)
            resources.push_async_callback(jobs.close)
            # A broker that is down keeps this process unready, not dead (and retried).
            resume = ResumeWhenReachable(jobs.resume_active, runtime.not_ready)
            await resume.start()
            resources.push_async_callback(resume.close)
            app.state.runtime, app.state.jobs = runtime, jobs
            on_startup(runtime, traffic)
            with on_shutdown_signal(runtime.start_draining, settings.drain_delay_seconds):
                yield

    app = FastAPI(
        title="embedpipe",
        version=__version__,
        summary="Text embeddings as a service: OpenAI-compatible, batched, cached.",
        lifespan=lifespan,
        # Served by install_docs from this process, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app, app.title)
    app.state.traffic = traffic
    app.include_router(openai.router)
    app.include_router(simple.router)
    app.include_router(tokenize.router)
    app.include_router(files_batches.router)
    app.include_router(ops.router)
    install_error_handlers(app)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.limits.max_body_bytes,
        # Uploads may be larger (plus room for the multipart framing).
        larger_for={"/v1/files": settings.jobs.max_file_bytes + 64 * 1024},
    )
    hosts = HostRule(allowed_hosts(settings.security.allowed_hosts, settings.host))
    # Inside the key check: a caller without a key gets its 401 first.
    app.add_middleware(CrossSiteGuardMiddleware, hosts=hosts)
    # API keys, outside the body limit: an unauthenticated body is never read.
    keys = install_security(app, settings)
    install_openapi(app, auth=keys.enabled)
    # Before the key check: a rebound Host is refused, key or not.
    app.add_middleware(HostGuardMiddleware, max_headers=settings.http.max_headers, hosts=hosts)
    app.add_middleware(DrainingMiddleware, is_draining=draining_of)
    app.add_middleware(ObservabilityMiddleware, traffic=traffic)
    # Inside the request id (the body's "id"), outside everything that may refuse a request.
    app.add_middleware(CohereErrorMiddleware, paths=COHERE_PATHS)
    app.add_middleware(RequestIdMiddleware)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings from the environment."""
    return create_app(Settings())
