"""The micro-batcher: coalesces texts of concurrent requests into model calls.

One batcher per model. Texts wait in a bounded queue; a single loop task forms a batch
(up to ``max_batch_size`` texts and ``max_batch_tokens`` padded tokens, after at most
``max_wait_ms`` for company) and runs it on the model's own thread, one call at a time.

On CPU the waste is padding: a batch is padded to its longest text. So a batch is formed
around the oldest waiting text (nothing starves) from the texts whose token lengths are
closest to it, not in arrival order, and stops growing before padding exceeds
``max_padding`` of it: a long text goes with a few long ones rather than making 31 short
ones pay its length (measured on the benchmark corpus: 0.59 of a nearest-32 batch's tokens
were real, 0.9 with the bound, for 1.6x the texts per CPU-second).

Waiting only pays when company can come: requests still looking up the cache announce
themselves (:meth:`MicroBatcher.on_the_way`), and with none on its way a text leaves at once.
A lone request so pays no wait, and under load texts still gather while the model is busy.

Batch jobs submit their texts as ``background``: a model call takes background texts only
while no online text waits, and background texts may fill at most half the queue, so a batch
of 100 x 2,048 inputs delays an online request by one model call, not by the whole queue.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from embedpipe import metrics
from embedpipe.embedders.base import PLAIN, Embedder, TextForm, Vectors
from embedpipe.errors import ModelFailed, NotReady, Overloaded
from embedpipe.settings import BatchingSettings

T = TypeVar("T")

log = logging.getLogger("embedpipe.batcher")

# Padding a batch may take per text on top of ``max_padding``: to short texts a few tokens of
# padding cost less than a model call of their own.
_PADDING_SLACK_TOKENS = 8


@dataclass(eq=False, slots=True)
class PendingText:
    """One text waiting for the model; its future may be shared by several requests."""

    text: str
    tokens: int
    future: asyncio.Future[np.ndarray]
    enqueued_at: float = field(default_factory=time.perf_counter)
    waiters: int = 1
    # A batch job's text: computed only while no online text waits. An online request that
    # joins it (the same text) makes it online.
    background: bool = False
    # Its prompt (kept apart from the text) and truncation side: part of its cache key, so
    # texts that share a future share a form.
    form: TextForm = PLAIN

    def join(self) -> None:
        self.waiters += 1

    def leave(self) -> None:
        """A waiter has gone (its client disconnected): when none is left, skip the work."""
        self.waiters -= 1
        if self.waiters <= 0 and not self.future.done():
            self.future.cancel()


async def wait_for_company(
    wakeup: asyncio.Event, deadline: float, full: Callable[[], bool]
) -> None:
    """Wait until ``full()`` (checked each time ``wakeup`` is set: new texts arrived) or the
    ``time.perf_counter()`` ``deadline``, whichever comes first."""
    while not full():
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return
        wakeup.clear()
        try:
            async with asyncio.timeout(remaining):
                await wakeup.wait()
        except TimeoutError:
            return


class Batcher(Protocol):
    """What the service needs from a model's batcher: :class:`MicroBatcher` for a local model,
    ``embedpipe.upstream.UpstreamBatcher`` for an upstream API."""

    @property
    def queue_depth(self) -> int: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def on_the_way(self) -> AbstractContextManager[None]:
        """Held by a request between its cache lookup's start and its :meth:`submit`: company
        that a batch may wait for."""
        ...

    def submit(
        self,
        texts: Sequence[str],
        tokens: Sequence[int],
        dimensions: int | None = None,
        *,
        background: bool = False,
        form: TextForm = PLAIN,
    ) -> list[PendingText]:
        """Queue texts, all or none. ``dimensions``: the size the model must compute (only
        for ``ModelInfo.upstream`` models; a local model's vectors are cut after the cache).
        ``background``: a batch job's texts, which yield to online ones. ``form``: how the
        model sees them (prompt apart, truncation side)."""
        ...


class MicroBatcher:
    def __init__(self, embedder: Embedder, settings: BatchingSettings) -> None:
        self._embedder = embedder
        self._settings = settings
        self._model = embedder.info.name
        self._pending: list[PendingText] = []
        self._wakeup = asyncio.Event()
        # The model's own thread: inference never runs on the event loop.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"model-{self._model}"
        )
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._on_the_way = 0  # requests looking up the cache, which may submit soon
        self._depth_gauge = metrics.QUEUE_DEPTH.labels(model=self._model)
        # Texts per second the model has been computing (moving average): how long a client
        # refused for a full queue should wait before it retries.
        self._texts_per_second = 0.0

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self._model}")

    async def on_model_thread(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on the model's thread, before :meth:`start` (warm-up, calibration).
        OpenMP keeps a pool of worker threads per calling thread; model calls on another
        thread leave a second pool, and with more pooled threads than cores libgomp spins 100
        times instead of 10,000."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(work, *args))

    async def stop(self) -> None:
        """Fail what still waits, stop the loop, then let a running model call finish."""
        self._closed = True
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(NotReady("the server is shutting down"))
        self._pending.clear()
        self._depth_gauge.set(0)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @contextmanager
    def on_the_way(self) -> Iterator[None]:
        self._on_the_way += 1
        try:
            yield
        finally:
            self._on_the_way -= 1
            self._wakeup.set()  # the last one gone: a waiting batch need wait no longer

    def submit(
        self,
        texts: Sequence[str],
        tokens: Sequence[int],
        dimensions: int | None = None,
        *,
        background: bool = False,
        form: TextForm = PLAIN,
    ) -> list[PendingText]:
        """Queue texts for the model, all or none: a full queue raises Overloaded (for
        ``background`` texts, half the queue: the other half stays free for online ones)."""
        if dimensions is not None:
            raise ValueError("a local model computes full vectors; cut them after the cache")
        if self._closed:
            raise NotReady("the server is shutting down")
        room = self._settings.max_queue_texts // (2 if background else 1)
        if len(self._pending) + len(texts) > room:
            raise Overloaded(
                f"The server is overloaded: {len(self._pending)} texts are waiting for "
                f"model '{self._model}'. Retry later.",
                retry_after=self._time_to_drain(len(self._pending)),
            )
        loop = asyncio.get_running_loop()
        items = [
            PendingText(
                text=text,
                tokens=count,
                future=loop.create_future(),
                background=background,
                form=form,
            )
            for text, count in zip(texts, tokens, strict=True)
        ]
        self._pending.extend(items)
        self._depth_gauge.set(len(self._pending))
        self._wakeup.set()
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            self._pending = [item for item in self._pending if not item.future.done()]
            batch = self._take_batch()
            self._depth_gauge.set(len(self._pending))
            if batch:
                await self._compute(loop, batch)

    async def _wait_for_company(self) -> None:
        """Give requests on their way up to max_wait (from the oldest text's arrival) to join;
        with none on its way, go at once (measured: the wait was 2.2 ms of a lone request's
        ~4 ms beyond the model)."""
        deadline = self._pending[0].enqueued_at + self._settings.max_wait_ms / 1000
        await wait_for_company(self._wakeup, deadline, self._enough_company)

    def _enough_company(self) -> bool:
        return not self._on_the_way or len(self._pending) >= self._settings.max_batch_size

    def _take_batch(self) -> list[PendingText]:
        """The oldest text plus its nearest neighbours by token length, within the limits;
        online texts only while any waits (batch jobs' texts yield to them)."""
        if not self._pending:
            return []
        online = [item for item in self._pending if not item.background]
        candidates = online or self._pending
        anchor = candidates[0]
        ordered = sorted(candidates, key=lambda item: item.tokens)
        lengths = [item.tokens for item in ordered]
        low = bisect.bisect_left(lengths, anchor.tokens)
        while ordered[low] is not anchor:
            low += 1
        high = low + 1  # the batch is ordered[low:high], ascending by tokens
        real = anchor.tokens  # tokens of the texts in the batch, padding excluded
        while high - low < self._settings.max_batch_size:
            sides = []
            if low > 0:
                sides.append((anchor.tokens - ordered[low - 1].tokens, -1))
            if high < len(ordered):
                sides.append((ordered[high].tokens - anchor.tokens, +1))
            grown = False
            for _distance, side in sorted(sides):
                added = ordered[low - 1] if side < 0 else ordered[high]
                longest = max(lengths[high - 1], added.tokens)
                if self._fits(high - low + 1, longest, real + added.tokens):
                    low, high = (low - 1, high) if side < 0 else (low, high + 1)
                    real += added.tokens
                    grown = True
                    break
            if not grown:
                break
        batch = ordered[low:high]
        chosen = set(map(id, batch))
        self._pending = [item for item in self._pending if id(item) not in chosen]
        return batch

    def _fits(self, size: int, longest: int, real: int) -> bool:
        """Whether ``size`` texts padded to ``longest`` (``real`` tokens of text) make one
        model call: within the token budget and padding bound."""
        padded = size * longest
        allowed = real / (1 - self._settings.max_padding) + _PADDING_SLACK_TOKENS * size
        return padded <= min(self._settings.max_batch_tokens, allowed)

    async def _compute(self, loop: asyncio.AbstractEventLoop, batch: list[PendingText]) -> None:
        started = time.perf_counter()
        for item in batch:
            metrics.QUEUE_WAIT.labels(model=self._model).observe(started - item.enqueued_at)
        metrics.BATCH_SIZE.labels(model=self._model).observe(len(batch))
        metrics.BATCH_TOKENS.labels(model=self._model).observe(
            len(batch) * max(item.tokens for item in batch)
        )
        try:
            vectors = await loop.run_in_executor(self._executor, self._embed_by_form, batch)
        except Exception:
            log.exception("model %s failed on a batch of %d texts", self._model, len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(ModelFailed("The model failed to embed the input."))
            return
        finally:
            metrics.INFERENCE_SECONDS.labels(model=self._model).observe(
                time.perf_counter() - started
            )
        rate = len(batch) / max(time.perf_counter() - started, 1e-6)
        self._texts_per_second = (
            rate if not self._texts_per_second else 0.8 * self._texts_per_second + 0.2 * rate
        )
        for item, vector in zip(batch, vectors, strict=True):
            if not item.future.done():
                item.future.set_result(vector)

    def _embed_by_form(self, batch: list[PendingText]) -> list[Vectors]:
        """On the model's thread: one model call per form in the batch (almost always one),
        the vectors back in the batch's order."""
        forms: dict[TextForm, list[int]] = {}
        for position, item in enumerate(batch):
            forms.setdefault(item.form, []).append(position)
        vectors: list[Vectors] = [np.empty(0, dtype=np.float32)] * len(batch)
        for form, positions in forms.items():
            texts = [batch[position].text for position in positions]
            computed = self._embedder.embed(texts, form)
            for position, vector in zip(positions, computed, strict=True):
                vectors[position] = vector
        return vectors

    def _time_to_drain(self, texts: int) -> float:
        """Seconds until ``texts`` queued texts are computed at the recent pace (1 to 60)."""
        if not self._texts_per_second:
            return 1.0
        return min(60.0, max(1.0, texts / self._texts_per_second))
