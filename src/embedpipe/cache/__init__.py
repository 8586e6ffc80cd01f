"""The tiered embedding cache: L1 in process, L2 in Redis (distributed) or SQLite (embedded).

Build it once in the composition root::

    cache = await open_cache(settings)
    hits = await cache.get_many([cache_key(ns, fingerprint, text) for text in texts])
    ...
    await cache.close()
"""

from __future__ import annotations

from embedpipe.cache.base import CacheTier, TierStats
from embedpipe.cache.keys import VectorCodec, bytes_to_vector, cache_key, vector_to_bytes
from embedpipe.cache.memory import MemoryTier
from embedpipe.cache.redis import RedisTier
from embedpipe.cache.sqlite import SqliteTier
from embedpipe.cache.tiered import TieredCache
from embedpipe.settings import Settings

__all__ = [
    "CacheTier",
    "MemoryTier",
    "RedisTier",
    "SqliteTier",
    "TierStats",
    "TieredCache",
    "VectorCodec",
    "bytes_to_vector",
    "cache_key",
    "open_cache",
    "vector_to_bytes",
]

SQLITE_FILE = "cache.sqlite3"


async def open_cache(settings: Settings) -> TieredCache:
    """The cache ``settings`` describe: Redis L2 when ``redis_url`` is set, else SQLite under
    ``data_dir``; neither (and an L1 of size 0) when ``cache.enabled`` is false."""
    cfg = settings.cache
    if not cfg.enabled:
        return TieredCache(MemoryTier(0), None)
    l2: CacheTier
    if settings.redis_url:
        l2 = RedisTier.from_url(settings.redis_url, cfg)
    else:
        l2 = await SqliteTier(
            settings.data_dir / SQLITE_FILE, cfg.sqlite_max_bytes, cfg.ttl_seconds
        ).open()
    return TieredCache(MemoryTier(cfg.l1_max_bytes), l2)
