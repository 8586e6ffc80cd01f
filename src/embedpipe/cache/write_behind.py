"""L2 writes that an online answer does not wait for.

A lone uncached request spent ~0.5 ms writing its vector to L2 (a hop to SQLite's thread and
back, or a Redis round trip) before its answer went out, and a write started at once, on the
loop, still took ~0.2 ms from the answer it ran beside. So the entries wait here a moment
(:data:`WRITE_DELAY`: the answers that made them go out first) and one writer task sends all
that gathered meanwhile in one L2 call, which under load is also fewer round trips.

The process's own L1 holds the values before the answer goes out, so this process never
computes them twice; another replica may, within that moment, as it already may for the same
text arriving at both at once. A stalled L2 holds writers back instead of piling entries up:
past :data:`MAX_UNWRITTEN` entries, a writer waits for the flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from embedpipe import metrics
from embedpipe.cache.base import CacheTier
from embedpipe.cache.packing import packed_items

log = logging.getLogger("embedpipe.cache")

WRITE_DELAY = 0.001  # seconds
MAX_UNWRITTEN = 4096  # entries (~7 MiB of 384-d vectors)


class WriteBehind:
    """Entries on their way to ``l2``: :meth:`add` returns at once, :meth:`flush` waits for
    everything added so far to be written (or to have failed, which the tier counts)."""

    def __init__(
        self,
        l2: CacheTier,
        *,
        delay: float = WRITE_DELAY,
        max_unwritten: int = MAX_UNWRITTEN,
    ) -> None:
        self._l2 = l2
        self._delay = delay
        self._max_unwritten = max_unwritten
        self._unwritten: dict[str, bytes] = {}
        self._writing = 0  # entries in the L2 call in progress
        self._writer: asyncio.Task[None] | None = None
        self._gauge = metrics.CACHE_WRITES_PENDING.labels(tier=l2.name)

    @property
    def pending(self) -> int:
        """Entries not yet in L2."""
        return len(self._unwritten) + self._writing

    async def add(self, items: Mapping[str, bytes]) -> None:
        """Queue ``items`` (values as L1 holds them) for L2; waits only past the bound."""
        self._unwritten.update(items)
        self._gauge.set(self.pending)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_all())
        if self.pending >= self._max_unwritten:
            await self.flush()

    async def flush(self) -> None:
        while self._writer is not None and not self._writer.done():
            # shield: a caller cancelled while it waits must not cancel everyone's writes.
            await asyncio.shield(self._writer)

    async def _write_all(self) -> None:
        await asyncio.sleep(self._delay)
        while self._unwritten:
            batch, self._unwritten = self._unwritten, {}
            self._writing = len(batch)
            try:
                await self._l2.set_many(packed_items(batch))
            except Exception:  # the tiers count their own failures; anything else is a bug
                log.exception("cache write to l2 failed: %d entries not written", len(batch))
            finally:
                self._writing = 0
                self._gauge.set(self.pending)
