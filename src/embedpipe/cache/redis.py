"""L2 in Redis, shared by every replica.

A cache must never make a request slower than computing the vector, so every Redis call here
is bounded three ways: short socket/connect timeouts, no client-side retries (redis-py 8
retries 10 times by default, which can hold a request for a minute against a hung server),
and an outer ``asyncio.timeout`` around the whole call. Failures turn into misses and feed a
circuit breaker; while it is open Redis is skipped entirely, and a half-open probe brings the
tier back by itself once Redis answers again.

``redis://host:port/db`` uses one server; add ``?cluster=true`` for Redis Cluster, served with
slot-aware multi-gets (``mget_nonatomic``) rather than one shared hash tag that would pin the
whole cache to one shard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from embedpipe.cache.base import TierStats
from embedpipe.cache.breaker import CircuitBreaker
from embedpipe.metrics import CACHE_ERRORS
from embedpipe.settings import CacheSettings

logger = logging.getLogger("embedpipe.cache")

# What a broken, slow or restarting Redis raises (asyncio.TimeoutError is TimeoutError, an
# OSError, on Python 3.11+; RedisClusterException is not a RedisError).
_EXPECTED_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
_CLEAR_BATCH = 500
_TRUE = {"1", "true", "yes", "on"}


def split_cluster_flag(url: str) -> tuple[str, bool]:
    """Strip the ``cluster`` query parameter (ours, unknown to redis-py) from ``url``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    cluster = any(k == "cluster" and v.lower() in _TRUE for k, v in query)
    rest = [(k, v) for k, v in query if k != "cluster"]
    return urlunsplit(parts._replace(query=urlencode(rest))), cluster


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisTier:
    """Cache tier ``l2`` over Redis (or Redis Cluster). Never raises from get/set.

    >>> tier = RedisTier.from_url("redis://localhost:6379/0", CacheSettings())
    >>> values = await tier.get_many(["ep:fp:..."])  # a list of bytes | None
    >>> await tier.close()
    """

    name = "l2"

    def __init__(
        self,
        client: Redis | RedisCluster,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.settings = settings
        self._ttl = settings.ttl_seconds or None
        self._chunk = settings.mget_chunk
        self._pattern = _glob_escape(settings.namespace + ":") + "*"
        # Outer bound of one call. The socket timeouts bound each read/connect; this bounds
        # the sum (connect + handshake + a pipelined reply) so a hung server cannot add up.
        self._deadline = max(
            2 * settings.redis_socket_timeout,
            settings.redis_connect_timeout + settings.redis_socket_timeout,
        )
        self.breaker = CircuitBreaker(
            settings.breaker_failures, settings.breaker_reset_seconds, self.name, clock
        )
        self._errors = CACHE_ERRORS.labels(tier=self.name)
        self.hits = 0
        self.misses = 0
        self.errors = 0

    @classmethod
    def from_url(cls, url: str, settings: CacheSettings) -> RedisTier:
        """Build the tier; connections are opened lazily by the first command."""
        url, cluster = split_cluster_flag(url)
        options: dict[str, Any] = {
            "socket_timeout": settings.redis_socket_timeout,
            "socket_connect_timeout": settings.redis_connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, **options)
        else:
            client = Redis.from_url(url, **options)
        return cls(client, settings)

    @property
    def client(self) -> Redis | RedisCluster:
        return self._client

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        if not self.breaker.allow():
            self._count_error()
            self.misses += len(keys)
            return [None] * len(keys)
        try:
            async with asyncio.timeout(self._deadline):
                values = await self._mget(list(keys))
        except Exception as exc:
            self._failed("get", exc)
            self.misses += len(keys)
            return [None] * len(keys)
        self.breaker.record_success()
        found = sum(v is not None for v in values)
        self.hits += found
        self.misses += len(keys) - found
        return values

    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        if isinstance(self._client, RedisCluster):
            # Groups keys by slot and node and pipelines one MGET per slot.
            return list(await self._client.mget_nonatomic(keys))
        chunks = [keys[i : i + self._chunk] for i in range(0, len(keys), self._chunk)]
        if len(chunks) == 1:
            # decode_responses is off, so values are bytes (the stubs also allow str).
            return cast(list[bytes | None], await self._client.mget(chunks[0]))
        # Several MGETs in one round trip: small enough each not to stall the server.
        async with self._client.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                pipe.mget(chunk)
            replies: list[list[bytes | None]] = await pipe.execute()
        return [value for reply in replies for value in reply]

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return
        if not self.breaker.allow():
            self._count_error()
            return
        try:
            async with asyncio.timeout(self._deadline):
                await self._set(items)
        except Exception as exc:
            self._failed("set", exc)
            return
        self.breaker.record_success()

    async def _set(self, items: Mapping[str, bytes]) -> None:
        if isinstance(self._client, RedisCluster):
            async with self._client.pipeline() as cpipe:
                for key, value in items.items():
                    cpipe.set(key, value, ex=self._ttl)
                await cpipe.execute()
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items.items():
                pipe.set(key, value, ex=self._ttl)
            await pipe.execute()

    def _count_error(self) -> None:
        self.errors += 1
        self._errors.inc()

    def _failed(self, op: str, exc: Exception) -> None:
        self._count_error()
        self.breaker.record_failure()
        if isinstance(exc, _EXPECTED_ERRORS):
            logger.debug("cache tier l2: %s failed: %r", op, exc)
        else:  # a bug rather than an outage: keep the traceback
            logger.warning("cache tier l2: unexpected error in %s", op, exc_info=exc)

    async def ping(self) -> bool:
        """Whether Redis answers now, within the same short bound (for ``/ready``)."""
        try:
            async with asyncio.timeout(self._deadline):
                return bool(await self._client.ping())
        except Exception:
            return False

    async def stats(self) -> TierStats:
        # Counting the keys under our prefix would need a SCAN of the whole keyspace, and
        # DBSIZE counts other users' keys too: report what we know cheaply.
        return TierStats(
            name=self.name,
            hits=self.hits,
            misses=self.misses,
            errors=self.errors,
            entries=None,
            bytes=None,
            healthy=self.breaker.is_closed,
        )

    async def clear(self) -> None:
        """Delete this namespace's keys (SCAN + UNLINK in batches; never FLUSHDB, since the
        Redis may be shared). Unlike get/set this raises when Redis fails: it is an operator
        action whose failure must be visible."""
        batch: list[bytes] = []  # keys come back undecoded
        removed = 0
        async for key in self._client.scan_iter(match=self._pattern, count=1000):
            batch.append(key)
            if len(batch) >= _CLEAR_BATCH:
                removed += await self._client.unlink(*batch)
                batch.clear()
        if batch:
            removed += await self._client.unlink(*batch)
        logger.info("cache tier l2: cleared %d keys matching %s", removed, self._pattern)

    async def close(self) -> None:
        await self._client.aclose()
