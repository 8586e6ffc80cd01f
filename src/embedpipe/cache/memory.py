"""L1: an in-process LRU bounded in bytes.

Everything runs on the event loop thread, so there is no lock: ``get``/``put`` are plain
synchronous calls the request path can use without awaiting.

Beside each vector L1 may keep the text's token count (what ``usage`` reports), so that a
request served from memory is not tokenised again: on a hit, tokenising was the largest cost
left. L2 stores only the vector; its hits are counted again and then remembered here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from embedpipe.cache.base import TierStats

# Measured on CPython 3.11: an OrderedDict slot (~66 B), the (value, tokens) tuple (56 B), the
# bytes header (33 B), the str header (49 B) and an int above 256 (28 B). Without it, many
# small values would overshoot the budget.
ENTRY_OVERHEAD = 232


def _cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


class MemoryTier:
    """A least-recently-used map of at most ``max_bytes`` (values, keys and overhead).

    ``max_bytes=0`` disables it: every lookup misses and nothing is stored.

    >>> l1 = MemoryTier(max_bytes=1 << 20)
    >>> l1.put("k", b"v", tokens=3)
    >>> l1.get("k")
    b'v'
    >>> l1.peek("k")
    (b'v', 3)
    """

    name = "l1"

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, tuple[bytes, int | None]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry[0]

    def get_all(self, keys: Sequence[str]) -> list[bytes] | None:
        """Every key's value, each counted as a hit; None when any is missing (and then
        nothing is counted: the caller goes the long way, which counts its own lookups)."""
        values: list[bytes] = []
        for key in keys:
            entry = self._data.get(key)
            if entry is None:
                return None
            values.append(entry[0])
        for key in keys:
            self._data.move_to_end(key)
        self.hits += len(keys)
        return values

    def peek(self, key: str) -> tuple[bytes, int | None] | None:
        """The value and token count (None when unknown) of ``key``, without counting a
        lookup or refreshing its place in the LRU order."""
        return self._data.get(key)

    def put(self, key: str, value: bytes, tokens: int | None = None) -> None:
        """Store ``value``; ``tokens`` is the text's token count, kept unless None (a value
        promoted from L2 without one keeps a count already known)."""
        cost = _cost(key, value)
        if cost > self.max_bytes:
            # Also the disabled case (max_bytes=0). Drop a stale copy rather than keep it.
            self._remove(key)
            return
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= _cost(key, old[0])
            if tokens is None:
                tokens = old[1]
        self._data[key] = (value, tokens)
        self._bytes += cost
        while self._bytes > self.max_bytes:
            old_key, (old_value, _) = self._data.popitem(last=False)
            self._bytes -= _cost(old_key, old_value)
            self.evictions += 1

    def _remove(self, key: str) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= _cost(key, old[0])

    # The CacheTier protocol, for callers that treat every tier alike.
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        for key, value in items.items():
            self.put(key, value)

    async def stats(self) -> TierStats:
        return TierStats(
            name=self.name,
            hits=self.hits,
            misses=self.misses,
            errors=0,
            entries=len(self._data),
            bytes=self._bytes,
            healthy=True,
        )

    async def clear(self) -> None:
        self._data.clear()
        self._bytes = 0

    async def close(self) -> None:
        await self.clear()
