"""Building the Batch API's machinery from settings: the store, the processor and the runner.

The API process calls ``open_job_service``; the Celery worker (``worker.py``) builds only a
store and a processor. Both take the ``Runtime`` that ``Runtime.open`` built.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

from embedpipe.batches.budget import BatchBudget
from embedpipe.batches.lease import is_redis_url
from embedpipe.batches.processor import BatchProcessor, when_there_is_room
from embedpipe.batches.runner import CeleryRunner, InProcessRunner, Runner
from embedpipe.batches.service import JobService
from embedpipe.batches.storage import Storage
from embedpipe.batches.store import JobStore
from embedpipe.batches.store_redis import RedisJobStore
from embedpipe.batches.store_sqlite import SqliteJobStore
from embedpipe.operations.openai_embeddings import (
    EmbeddingRequest,
    embed_inputs,
    prepare,
    prepare_inputs,
    respond,
)
from embedpipe.operations.rerank import RerankRequest, cohere_body, rank
from embedpipe.operations.rerank import prepare as prepare_rerank
from embedpipe.runtime import Runtime
from embedpipe.settings import Settings
from embedpipe.tenancy import current_tenant

log = logging.getLogger("embedpipe.batches")


def open_store(settings: Settings) -> JobStore:
    if settings.distributed:
        # The broker Redis (noeviction): job state must never be evicted like cache entries.
        # With RabbitMQ as the broker, job state lives in EMBEDPIPE_REDIS_URL's Redis.
        broker = settings.effective_broker_url
        url = broker if is_redis_url(broker) else settings.redis_url
        if url != settings.broker_url:  # not a Redis the operator chose for them
            log.warning(
                "batch jobs and files are kept in the cache Redis (EMBEDPIPE_REDIS_URL), as "
                "EMBEDPIPE_BROKER_URL names no Redis of their own: a cache Redis that evicts "
                "(allkeys-lru/lfu, as production configures it) loses batches, files and queued "
                "chunks. Point EMBEDPIPE_BROKER_URL at a Redis with maxmemory-policy noeviction, "
                "or keep the cache Redis at noeviction."
            )
        return RedisJobStore.from_url(url, settings.cache.namespace)
    return SqliteJobStore(settings.data_dir / "jobs.sqlite3")


def new_processor(settings: Settings, runtime: Runtime, store: JobStore) -> BatchProcessor:
    """A processor whose lines are answered by the same operation as ``/v1/embeddings``,
    charged to their key's batch budget and computed as background work (online requests
    go first)."""
    service, decoder, limits = runtime.service, runtime.token_decoder, settings.limits
    budget = BatchBudget.from_settings(runtime.limiter, settings)

    async def embed(request: EmbeddingRequest) -> dict[str, Any]:
        # Not through the service's remembered rows: a dataset's rows are seldom served twice,
        # and they would push out those of online cache hits.
        prepared = replace(prepare(service, decoder, limits, request), remembered=None)
        inputs = await prepare_inputs(service, limits, prepared)
        # The chunk runs as its batch's owner (tenancy.serving_tenant): that key pays.
        await budget.charge(current_tenant(), inputs.total_tokens)
        # Waits for room here, after the charge: a full queue must not charge it again.
        result = await when_there_is_room(
            lambda: embed_inputs(service, prepared, inputs, background=True)
        )
        return respond(prepared, result)

    async def rerank(request: RerankRequest) -> dict[str, Any]:
        prepared = prepare_rerank(
            service,
            limits,
            model=request.model,
            route="/v1/rerank",
            query=request.query,
            documents=request.documents,
            top_n=request.top_n,
            max_tokens_per_doc=request.max_tokens_per_doc,
        )
        inputs = await service.clip(prepared.model, prepared.inputs)
        tokens = await service.count_tokens(prepared.model, inputs)
        await budget.charge(current_tenant(), sum(tokens))
        result = await when_there_is_room(
            lambda: service.embed(prepared.model, inputs, tokens, background=True)
        )
        ranked = rank(service, prepared, result, raw=False)
        return cohere_body(prepared, ranked, return_documents=request.return_documents)

    return BatchProcessor(store, Storage(settings.data_dir), settings.jobs, embed, rerank)


async def open_job_service(settings: Settings, runtime: Runtime) -> JobService:
    """For the API process: in-process runner on the embedded default, Celery otherwise."""
    async with AsyncExitStack() as opened:
        store = open_store(settings)
        opened.push_async_callback(store.close)
        processor = new_processor(settings, runtime, store)
        runner: Runner
        if settings.distributed:
            from embedpipe.batches.celery_app import create_celery  # celery: only when used

            runner = CeleryRunner(create_celery(settings), settings.jobs.queue)
            if is_redis_url(settings.effective_broker_url):
                runner.sweep_lapsed_leases(max(1.0, settings.jobs.visibility_timeout_seconds / 6))
        else:
            runner = InProcessRunner(processor, settings.jobs.in_process_concurrency)
        opened.push_async_callback(runner.close)
        # Nothing here talks to the broker: JobService.resume_active does, once it answers
        # (batches/resume.py), so a broker that is down leaves the API unready, not dead.
        jobs = JobService(store, Storage(settings.data_dir), settings.jobs, processor, runner)
        # Opened: from now on the service closes its runner and store (JobService.close).
        opened.pop_all()
        return jobs
    raise AssertionError("unreachable")  # mypy: the block above returns or raises
