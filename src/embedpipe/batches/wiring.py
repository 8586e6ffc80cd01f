"""Building the Batch API's machinery from settings: the store, the processor and the runner.

The API process calls ``open_job_service``; the Celery worker (``worker.py``) builds only a
store and a processor. Both take the ``Runtime`` that ``Runtime.open`` built.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from embedpipe.batches.processor import BatchProcessor
from embedpipe.batches.runner import CeleryRunner, InProcessRunner, Runner
from embedpipe.batches.service import JobService
from embedpipe.batches.storage import Storage
from embedpipe.batches.store import JobStore
from embedpipe.batches.store_redis import RedisJobStore
from embedpipe.batches.store_sqlite import SqliteJobStore
from embedpipe.operations.openai_embeddings import EmbeddingRequest, create_embeddings
from embedpipe.runtime import Runtime
from embedpipe.settings import Settings


def open_store(settings: Settings) -> JobStore:
    if settings.distributed:
        # The broker Redis (noeviction): job state must never be evicted like cache entries.
        return RedisJobStore.from_url(settings.effective_broker_url, settings.cache.namespace)
    return SqliteJobStore(settings.data_dir / "jobs.sqlite3")


def new_processor(settings: Settings, runtime: Runtime, store: JobStore) -> BatchProcessor:
    """A processor whose lines are answered by the same operation as ``/v1/embeddings``."""
    service, decoder, limits = runtime.service, runtime.token_decoder, settings.limits

    async def embed(request: EmbeddingRequest) -> dict[str, Any]:
        return await create_embeddings(service, decoder, limits, request)

    return BatchProcessor(store, Storage(settings.data_dir), settings.jobs, embed)


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
