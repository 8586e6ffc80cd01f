"""Building the job machinery from settings: the store, the processor and the runner."""

from __future__ import annotations

from embedpipe.jobs.processor import BatchProcessor
from embedpipe.jobs.service import JobService
from embedpipe.jobs.storage import Storage
from embedpipe.jobs.store import JobStore
from embedpipe.jobs.store_redis import RedisJobStore
from embedpipe.jobs.store_sqlite import SqliteJobStore
from embedpipe.openai_embeddings import create_embeddings
from embedpipe.runtime import Runtime
from embedpipe.settings import Settings


def open_store(settings: Settings) -> JobStore:
    if settings.distributed:
        # The broker Redis (noeviction): job state must never be evicted like cache entries.
        return RedisJobStore.from_url(settings.effective_broker_url, settings.cache.namespace)
    return SqliteJobStore(settings.data_dir / "jobs.sqlite3")


async def open_processor(settings: Settings, runtime: Runtime) -> tuple[BatchProcessor, JobStore]:
    store = open_store(settings)
    service, decoder, limits = runtime.service, runtime.token_decoder, settings.limits

    async def embed(request: object) -> dict[str, object]:
        from embedpipe.api.schemas import EmbeddingRequest

        assert isinstance(request, EmbeddingRequest)
        return await create_embeddings(service, decoder, limits, request)

    processor = BatchProcessor(store, Storage(settings.data_dir), settings.jobs, embed)
    return processor, store


async def open_job_service(settings: Settings, runtime: Runtime) -> JobService:
    """For the API process: in-process runner on the embedded default, Celery otherwise.
    Nothing here talks to the broker: ``JobService.resume_active`` does, once it answers."""
    from embedpipe.jobs.runner import CeleryRunner, InProcessRunner, Runner

    processor, store = await open_processor(settings, runtime)
    runner: Runner
    if settings.distributed:
        from embedpipe.jobs.celery_app import create_celery

        runner = CeleryRunner(create_celery(settings), settings.jobs.queue)
    else:
        runner = InProcessRunner(processor, settings.jobs.in_process_concurrency)
    return JobService(store, Storage(settings.data_dir), settings.jobs, processor, runner)
