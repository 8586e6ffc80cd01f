"""Where batch work runs.

Runner (protocol)
├── InProcessRunner   embedded default: bounded asyncio work inside the server process
└── CeleryRunner      distributed: tasks on the Redis broker for `embedpipe worker`s
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from embedpipe.batches.processor import BatchProcessor

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("embedpipe.batches")

PREPARE_TASK = "embedpipe.prepare_batch"
CHUNK_TASK = "embedpipe.run_chunk"

_CHUNK_ATTEMPTS = 6


class Runner(Protocol):
    async def submit(self, batch_id: str) -> None: ...

    async def resume(self, batch_ids: list[str]) -> None:
        """Pick up batches that were active when the process stopped."""
        ...

    async def close(self) -> None: ...


class InProcessRunner:
    """Runs each batch as a task of its own; at most ``concurrency`` chunks compute at once
    across all batches, so batch work cannot crowd out online requests."""

    def __init__(self, processor: BatchProcessor, concurrency: int) -> None:
        self._processor = processor
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, batch_id: str) -> None:
        task = asyncio.create_task(self._run(batch_id), name=f"batch-{batch_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self, batch_ids: list[str]) -> None:
        for batch_id in batch_ids:
            log.info("resuming batch %s", batch_id)
            await self.submit(batch_id)

    async def _run(self, batch_id: str) -> None:
        try:
            chunks = await self._processor.prepare(batch_id)
            await asyncio.gather(*(self._chunk(batch_id, index) for index in range(chunks)))
            await self._processor.maybe_finalize(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The batch stays active in the store and is resumed at the next start.
            log.exception("batch %s: runner failed", batch_id)

    async def _chunk(self, batch_id: str, index: int) -> None:
        for attempt in range(_CHUNK_ATTEMPTS):
            try:
                async with self._slots:
                    await self._processor.run_chunk(batch_id, index)
                return
            except Exception:
                if attempt == _CHUNK_ATTEMPTS - 1:
                    raise  # left active: resumed at the next start
                log.warning("batch %s chunk %d failed, retrying", batch_id, index, exc_info=True)
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class CeleryRunner:
    """Producer side: the API only enqueues; workers prepare and compute."""

    def __init__(self, celery: Celery, queue: str) -> None:
        self._celery = celery
        self._queue = queue

    async def submit(self, batch_id: str) -> None:
        # Publishing is a blocking socket call: keep it off the event loop.
        await asyncio.to_thread(
            self._celery.send_task, PREPARE_TASK, args=[batch_id], queue=self._queue
        )

    async def resume(self, batch_ids: list[str]) -> None:
        # Nothing to do: unacknowledged tasks return to the queue by themselves (acks late
        # + the broker's visibility timeout), whichever process stopped.
        return None

    async def close(self) -> None:
        await asyncio.to_thread(self._celery.close)
