"""What every cache tier offers. Keys are strings from ``cache/keys.py``; values are raw
little-endian float32 bytes (a 384-d vector is 1,536 bytes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TierStats:
    """A tier's own counters (never Redis's keyspace-wide INFO)."""

    name: str
    hits: int
    misses: int
    errors: int
    entries: int | None  # None when counting would be too costly or the tier is down
    bytes: int | None
    healthy: bool

    @property
    def hit_ratio(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class CacheTier(Protocol):
    """One tier of the cache. Implementations never raise on get/set: a failing tier reports
    misses (and counts an error), so the request is still served."""

    name: str

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Mapping[str, bytes]) -> None: ...

    async def stats(self) -> TierStats: ...

    async def clear(self) -> None: ...

    async def close(self) -> None: ...
