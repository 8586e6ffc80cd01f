"""The batcher of an upstream model: texts of concurrent requests packed into API calls.

It offers the service what :class:`~embedpipe.batcher.MicroBatcher` offers (``submit`` ->
futures), so cache, dedupe, single-flight and write-back stay one code path. The work is I/O,
not CPU, so there is no model thread: calls run on the event loop, several at once.

Texts wait in one FIFO queue per requested ``dimensions`` (one call has one size). A loop
task waits up to ``max_wait_ms`` for company, then for a free call slot (of ``concurrency``),
then packs the oldest queue's texts in arrival order into one call of at most
``max_inputs_per_call`` inputs and ``max_tokens_per_call`` tokens: a request bigger than that
becomes several calls, small requests share one. Padding costs nothing upstream, so there is
no sorting by length.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

from embedpipe import metrics
from embedpipe.batcher import PendingText, wait_for_company
from embedpipe.embedders.base import PLAIN, TextForm, Vectors
from embedpipe.errors import EmbedpipeError, NotReady, Overloaded, UpstreamFailed
from embedpipe.settings import UpstreamSettings
from embedpipe.upstream.client import UpstreamClient
from embedpipe.upstream.model import UpstreamModel

log = logging.getLogger("embedpipe.upstream")

Dimensions = int | None


class UpstreamBatcher:
    def __init__(
        self, model: UpstreamModel, client: UpstreamClient, settings: UpstreamSettings
    ) -> None:
        self._model = model
        self._client = client
        self._settings = settings
        self._name = model.info.name
        self._queues: dict[Dimensions, list[PendingText]] = {}
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._calls: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._depth_gauge = metrics.QUEUE_DEPTH.labels(model=self._name)

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def client(self) -> UpstreamClient:
        return self._client

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"upstream-{self._name}")

    async def stop(self) -> None:
        """Fail what still waits, stop the loop and the calls in flight, close the client."""
        self._closed = True
        for queue in self._queues.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(NotReady("the server is shutting down"))
        self._queues.clear()
        self._queued = 0
        self._depth_gauge.set(0)
        tasks = [task for task in (self._task, *self._calls) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.close()

    def on_the_way(self) -> AbstractContextManager[None]:
        """Not counted: an upstream call waits its max_wait_ms whatever comes, as texts that
        share a call save the upstream's rate limit, and its round trip dwarfs the wait."""
        return nullcontext()

    def submit(
        self,
        texts: Sequence[str],
        tokens: Sequence[int],
        dimensions: int | None = None,
        *,
        background: bool = False,
        form: TextForm = PLAIN,
    ) -> list[PendingText]:
        """Queue texts for upstream calls of vectors of ``dimensions`` (None: full size), all
        or none: a full queue raises Overloaded. ``background`` is accepted but not yet used:
        batch texts queue for an upstream like online ones. ``form``: plain only (an upstream
        model's prompts are part of its texts, and it never truncates)."""
        if form != PLAIN:
            raise ValueError("an upstream model takes its texts in the plain form")
        if self._closed:
            raise NotReady("the server is shutting down")
        if self._queued + len(texts) > self._settings.max_queue_texts:
            raise Overloaded(
                f"The server is overloaded: {self._queued} texts are waiting for the upstream "
                f"API of model '{self._name}'. Retry later.",
                retry_after=1.0,
            )
        loop = asyncio.get_running_loop()
        items = [
            PendingText(text=text, tokens=count, future=loop.create_future())
            for text, count in zip(texts, tokens, strict=True)
        ]
        self._queues.setdefault(dimensions, []).extend(items)
        self._queued += len(items)
        self._depth_gauge.set(self._queued)
        self._wakeup.set()
        return items

    async def _run(self) -> None:
        while True:
            if not self._queued:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            # Texts keep arriving while every slot is busy: the next call leaves fuller.
            await self._slots.acquire()
            dimensions, call = self._take_call()
            self._depth_gauge.set(self._queued)
            if not call:
                self._slots.release()
                continue
            task = asyncio.create_task(self._send(dimensions, call))
            self._calls.add(task)
            task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        self._slots.release()

    async def _wait_for_company(self) -> None:
        """Until a call is full or the oldest text has waited ``max_wait_ms``."""
        oldest = min(queue[0].enqueued_at for queue in self._queues.values() if queue)
        deadline = oldest + self._settings.max_wait_ms / 1000
        await wait_for_company(self._wakeup, deadline, self._a_call_is_full)

    def _a_call_is_full(self) -> bool:
        limit_inputs = self._settings.max_inputs_per_call
        limit_tokens = self._settings.max_tokens_per_call
        for queue in self._queues.values():
            if len(queue) >= limit_inputs:
                return True
            total = 0
            for item in queue:
                total += item.tokens
                if total >= limit_tokens:
                    return True
        return False

    def _take_call(self) -> tuple[Dimensions, list[PendingText]]:
        """The next call: from the queue with the oldest text, texts in arrival order up to
        the limits (always at least one; texts nobody waits for any more are dropped)."""
        for dimensions in list(self._queues):
            queue = self._queues[dimensions]
            live = [item for item in queue if not item.future.done()]
            self._queued -= len(queue) - len(live)
            if live:
                self._queues[dimensions] = live
            else:
                del self._queues[dimensions]
        if not self._queues:
            return None, []
        dimensions = min(self._queues, key=lambda key: self._queues[key][0].enqueued_at)
        queue = self._queues[dimensions]
        count, tokens = 0, 0
        for item in queue:
            if count and (
                count >= self._settings.max_inputs_per_call
                or tokens + item.tokens > self._settings.max_tokens_per_call
            ):
                break
            count += 1
            tokens += item.tokens
        call, rest = queue[:count], queue[count:]
        if rest:
            self._queues[dimensions] = rest
        else:
            del self._queues[dimensions]
        self._queued -= count
        return dimensions, call

    async def _send(self, dimensions: Dimensions, call: list[PendingText]) -> None:
        """One call; every waiter gets its vector or the call's error, never a hang."""
        started = time.perf_counter()
        for item in call:
            metrics.QUEUE_WAIT.labels(model=self._name).observe(started - item.enqueued_at)
        metrics.BATCH_SIZE.labels(model=self._name).observe(len(call))
        error: EmbedpipeError
        try:
            vectors = await self._vectors(dimensions, call)
        except asyncio.CancelledError:
            # Stopped mid-call (shutdown): the waiters get an answer, not a hang.
            self._fail(call, NotReady("the server is shutting down"))
            raise
        except EmbedpipeError as exc:
            error = exc
        except Exception:
            log.exception("upstream model %s failed on a call of %d texts", self._name, len(call))
            error = UpstreamFailed(f"The upstream call for model '{self._name}' failed.")
        else:
            for item, vector in zip(call, vectors, strict=True):
                if not item.future.done():
                    item.future.set_result(vector)
            return
        finally:
            metrics.INFERENCE_SECONDS.labels(model=self._name).observe(
                time.perf_counter() - started
            )
        self._fail(call, error)

    async def _vectors(self, dimensions: Dimensions, call: list[PendingText]) -> Vectors:
        tokens = sum(item.tokens for item in call)
        answer = await self._client.embed([item.text for item in call], dimensions, tokens)
        width = answer.vectors.shape[1]
        fits = width == dimensions if dimensions else self._model.accept_dimensions(width)
        if not fits:
            expected = dimensions or self._model.info.dimensions
            log.error(
                "upstream model %s answered %d-dimensional vectors, expected %d "
                "(check EMBEDPIPE_OPENAI_DIMENSIONS)",
                self._name,
                width,
                expected,
            )
            raise UpstreamFailed(
                f"The upstream API of model '{self._name}' answered {width}-dimensional "
                f"vectors where {expected} were expected.",
                code="upstream_bad_response",
            )
        return answer.vectors

    @staticmethod
    def _fail(call: list[PendingText], error: EmbedpipeError) -> None:
        # One error object for all: it carries only a message, a code and a Retry-After.
        for item in call:
            if not item.future.done():
                item.future.set_exception(error)
