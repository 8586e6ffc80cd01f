"""The two-level cache the request path uses: L1 in process, then ONE L2 round trip.

L1 holds values as the service encodes them (a hit there costs no conversion); L2 holds float32
vectors packed losslessly to 31 bits per component (``cache/packing.py``), which keeps a 384-d
entry in a smaller Redis allocation. An online answer does not wait for its L2 write
(``cache/write_behind.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from embedpipe.cache.base import CacheTier, TierStats
from embedpipe.cache.memory import MemoryTier
from embedpipe.cache.packing import packed_items, unpack_many
from embedpipe.cache.write_behind import WriteBehind

Source = Literal["l1", "l2"]


class TieredCache:
    """L1 (:class:`MemoryTier`) in front of an optional L2 (Redis or SQLite).

    >>> cache = TieredCache(MemoryTier(64 << 20), l2=None)
    >>> await cache.set_many({"k": b"v"})
    >>> await cache.get_many(["k", "x"])
    [(b'v', 'l1'), None]
    """

    def __init__(
        self, l1: MemoryTier, l2: CacheTier | None, write_behind: WriteBehind | None = None
    ) -> None:
        """``write_behind``: where ``set_many(..., wait=False)`` leaves L2's entries (one is
        made for ``l2`` when not given)."""
        self.l1 = l1
        self.l2 = l2
        self._behind = write_behind or (WriteBehind(l2) if l2 is not None else None)

    async def get_many(
        self, keys: Sequence[str], tokens: Sequence[int] | None = None
    ) -> list[tuple[bytes, Source] | None]:
        """Each key's value and the tier that had it, or None on a miss (in order).
        ``tokens``: each key's token count, kept in L1 with the values promoted from L2."""
        found: list[tuple[bytes, Source] | None] = []
        missing: dict[str, None] = {}  # unique L1 misses, in first-seen order
        for key in keys:
            value = self.l1.get(key)
            if value is None:
                found.append(None)
                missing[key] = None
            else:
                found.append((value, "l1"))
        if not missing or self.l2 is None:
            return found
        wanted = list(missing)
        values = unpack_many(await self.l2.get_many(wanted))
        from_l2 = {k: v for k, v in zip(wanted, values, strict=True) if v is not None}
        token_of = dict(zip(keys, tokens, strict=True)) if tokens is not None else {}
        for key, value in from_l2.items():
            # Promote: the next lookup stays in process.
            self.l1.put(key, value, token_of.get(key))
        for i, key in enumerate(keys):
            if found[i] is None and key in from_l2:
                found[i] = (from_l2[key], "l2")
        return found

    async def set_many(
        self,
        items: Mapping[str, bytes],
        tokens: Mapping[str, int] | None = None,
        *,
        wait: bool = True,
    ) -> None:
        """Write to both tiers; ``tokens`` (by key) are kept in L1 beside the values.
        ``wait=False`` (an online answer): return once L1 holds them, L2's write following
        (awaited by :meth:`flush`, :meth:`stats`, :meth:`clear` and :meth:`close`)."""
        token_of = tokens or {}
        for key, value in items.items():
            self.l1.put(key, value, token_of.get(key))
        if self.l2 is None or not items:
            return
        if not wait and self._behind is not None:
            await self._behind.add(items)
            return
        await self.l2.set_many(packed_items(items))

    @property
    def pending_writes(self) -> int:
        """Entries on their way to L2 behind answers already given."""
        return self._behind.pending if self._behind is not None else 0

    async def flush(self) -> None:
        """Wait until every entry written so far is in L2 (or failed, as the tier counts)."""
        if self._behind is not None:
            await self._behind.flush()

    async def stats(self) -> list[TierStats]:
        await self.flush()  # entries counted with the answers already given
        tiers = [await self.l1.stats()]
        if self.l2 is not None:
            tiers.append(await self.l2.stats())
        return tiers

    async def clear(self) -> None:
        await self.flush()  # no write in flight lands after the clear
        await self.l1.clear()
        if self.l2 is not None:
            await self.l2.clear()

    async def close(self) -> None:
        await self.flush()
        await self.l1.close()
        if self.l2 is not None:
            await self.l2.close()
