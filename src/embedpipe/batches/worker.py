"""The Celery worker process: its composition root (``embedpipe worker``).

One ``WorkerContext`` per process owns an event loop on its own thread and, opened on the
first task, the ``Runtime`` (models, batchers, cache, limiter, built by ``Runtime.open`` as in
the API) plus the job store and the processor. It closes all of them when the worker stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from embedpipe.batches.celery_app import create_celery, register_tasks
from embedpipe.batches.processor import BatchProcessor
from embedpipe.batches.wiring import new_processor, open_store
from embedpipe.runtime import Runtime
from embedpipe.settings import Settings

log = logging.getLogger("embedpipe.worker")

T = TypeVar("T")


class WorkerContext:
    """What one worker process needs, made once on first use: an event loop on its own
    thread, the Runtime and the BatchProcessor."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="embedpipe-loop", daemon=True
        )
        self._opened: Future[BatchProcessor] | None = None
        self._resources = AsyncExitStack()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def processor(self) -> BatchProcessor:
        with self._lock:
            if self._opened is None:
                self._opened = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        return self._opened.result()

    async def _open(self) -> BatchProcessor:
        runtime = await Runtime.open(self._settings)
        self._resources.push_async_callback(runtime.close)
        store = open_store(self._settings)
        self._resources.push_async_callback(store.close)
        log.info("worker ready: models loaded, job store open")
        return new_processor(self._settings, runtime, store)

    def close(self) -> None:
        """Close what was opened (last first), then stop the loop."""
        if not self._thread.is_alive():
            return
        try:
            self.run(self._resources.aclose())
        except Exception:
            log.exception("closing the worker's resources failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


def run_worker(settings: Settings, *, loglevel: str, hostname: str | None) -> None:
    """Consume the batch queue until Celery shuts down, then close what the tasks opened."""
    celery = create_celery(settings)
    context = WorkerContext(settings)
    register_tasks(celery, context, settings.jobs.queue)
    name = hostname or f"embedpipe@{socket.gethostname()}.{os.getpid()}"
    context.start()
    try:
        # solo pool: the chunk runs in this process, where the model is loaded once.
        celery.worker_main(
            [
                "worker",
                "--pool=solo",
                f"--loglevel={loglevel}",
                f"--hostname={name}",
                f"--queues={settings.jobs.queue}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        context.close()
