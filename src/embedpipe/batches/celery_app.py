"""The Celery application, built from settings (no module-level app), and its tasks.

The API process only publishes (``runner.CeleryRunner``); ``batches/worker.py`` consumes.
Tasks are thin adapters over BatchProcessor. Reliability comes from the configuration:
acks late + reject on worker lost + the Redis visibility timeout mean a chunk whose worker
died (even by SIGKILL) is delivered again; idempotent chunk commits make that harmless.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from celery import Celery, Task

from embedpipe.batches.runner import CHUNK_TASK, PREPARE_TASK
from embedpipe.settings import Settings

if TYPE_CHECKING:
    from embedpipe.batches.processor import BatchProcessor

T = TypeVar("T")


def create_celery(settings: Settings) -> Celery:
    broker = settings.effective_broker_url
    if not broker:
        raise ValueError("Celery needs EMBEDPIPE_BROKER_URL or EMBEDPIPE_REDIS_URL")
    app = Celery("embedpipe", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per worker process: a dead worker strands at most one chunk.
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.jobs.visibility_timeout_seconds,
        },
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.jobs.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


class ChunkContext(Protocol):
    """What the tasks run on: the worker's processor, opened once, and a way to run a
    coroutine on the worker's event loop (``batches/worker.py``)."""

    def processor(self) -> BatchProcessor: ...

    def run(self, work: Coroutine[Any, Any, T]) -> T: ...


def register_tasks(app: Celery, context: ChunkContext, queue: str) -> None:
    @app.task(name=PREPARE_TASK, bind=True, max_retries=10, default_retry_delay=5)  # type: ignore[untyped-decorator]
    def prepare_batch(task: Task[Any, Any], batch_id: str) -> None:
        processor = context.processor()
        try:
            chunks = context.run(processor.prepare(batch_id))
        except Exception as error:
            raise task.retry(exc=error) from error
        for index in range(chunks):
            app.send_task(CHUNK_TASK, args=[batch_id, index], queue=queue)

    @app.task(name=CHUNK_TASK, bind=True, max_retries=10, default_retry_delay=5)  # type: ignore[untyped-decorator]
    def run_chunk(task: Task[Any, Any], batch_id: str, index: int) -> None:
        processor = context.processor()
        try:
            context.run(processor.run_chunk(batch_id, index))
        except Exception as error:
            raise task.retry(exc=error) from error
