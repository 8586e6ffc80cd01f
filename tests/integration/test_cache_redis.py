"""The Redis L2 against a real redis-server, including real faults: a paused (SIGSTOP) server,
a killed one and a restart on the same port. Nothing here mocks Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from embedpipe.cache import (
    MemoryTier,
    RedisTier,
    TieredCache,
    bytes_to_vector,
    cache_key,
    open_cache,
    vector_to_bytes,
)
from embedpipe.cache.packing import unpack_many
from embedpipe.cache.redis import split_cluster_flag
from embedpipe.settings import CacheSettings, Settings
from tests.redis_server import (
    NO_REDIS_SERVER,
    RedisClusterServers,
    RedisServer,
    find_redis_server,
)

T = TypeVar("T")
# Tight timeouts and a short reset so the fault tests take seconds, not minutes.
FAST = {
    "redis_socket_timeout": 0.2,
    "redis_connect_timeout": 0.2,
    "breaker_failures": 2,
    "breaker_reset_seconds": 0.5,
}
BOUND = 2.0  # seconds: generous, a hung server would otherwise hold a call for a minute


def value(i: int) -> bytes:
    return vector_to_bytes(np.full(384, i, dtype=np.float32))


def errors_total() -> float:
    return REGISTRY.get_sample_value("embedpipe_cache_errors_total", {"tier": "l2"}) or 0.0


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = await call
    return result, time.perf_counter() - start


@pytest.fixture
async def make_tier(namespace: str) -> AsyncIterator[Callable[..., RedisTier]]:
    """Build tiers on a URL; each is cleared (its namespace only) and closed afterwards.
    Request a server fixture before this one, so the tiers close while it still runs."""
    tiers: list[RedisTier] = []

    def make(url: str, **settings: object) -> RedisTier:
        options: dict[str, object] = {"namespace": namespace, **settings}
        tier = RedisTier.from_url(url, CacheSettings.model_validate(options))
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        if await tier.ping():
            await tier.clear()
        await tier.close()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    if find_redis_server() is None:
        pytest.skip(NO_REDIS_SERVER)
    with RedisClusterServers(tmp_path) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def test_cluster_flag_is_ours_and_stripped_from_the_url() -> None:
    assert split_cluster_flag("redis://h:7000/0?cluster=true&socket_timeout=1") == (
        "redis://h:7000/0?socket_timeout=1",
        True,
    )
    assert split_cluster_flag("rediss://:pw@h:6379/2") == ("rediss://:pw@h:6379/2", False)
    assert split_cluster_flag("redis://h?cluster=false") == ("redis://h", False)


@pytest.mark.redis
async def test_round_trip_of_float32_vectors(
    make_tier: Callable[..., RedisTier], namespace: str, redis_url: str
) -> None:
    tier = make_tier(redis_url)
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    key = f"{namespace}:fp:abc"
    await tier.set_many({key: vector_to_bytes(vector)})
    [data] = await tier.get_many([key])
    assert data is not None and len(data) == 1536
    np.testing.assert_array_equal(bytes_to_vector(data), vector)
    stats = await tier.stats()
    assert (stats.hits, stats.misses, stats.errors, stats.healthy) == (1, 0, 0, True)
    assert await tier.get_many([]) == []
    assert await tier.ping()


@pytest.mark.redis
async def test_large_lookups_are_chunked_mgets_in_one_round_trip(
    private_redis: RedisServer, make_tier: Callable[..., RedisTier], namespace: str
) -> None:
    tier = make_tier(private_redis.url, mget_chunk=256)
    keys = [f"{namespace}:fp:{i}" for i in range(700)]
    await tier.set_many({k: value(i) for i, k in enumerate(keys) if i % 3})
    async with Redis.from_url(private_redis.url) as admin:
        await admin.config_resetstat()
        values = await tier.get_many(keys)
        stats = await admin.info("commandstats")
    assert values == [value(i) if i % 3 else None for i in range(700)]
    assert stats["cmdstat_mget"]["calls"] == 3  # 256 + 256 + 188
    assert (tier.hits, tier.misses) == (466, 234)


@pytest.mark.redis
async def test_entries_get_the_ttl(
    make_tier: Callable[..., RedisTier], namespace: str, redis_url: str, raw: Redis
) -> None:
    await make_tier(redis_url, ttl_seconds=100).set_many({f"{namespace}:a": b"1"})
    await make_tier(redis_url, ttl_seconds=0).set_many({f"{namespace}:b": b"2"})
    assert 0 < await raw.ttl(f"{namespace}:a") <= 100
    assert await raw.ttl(f"{namespace}:b") == -1  # 0 = no expiry


@pytest.mark.redis
async def test_clear_removes_only_its_namespace(
    make_tier: Callable[..., RedisTier], namespace: str, redis_url: str, raw: Redis
) -> None:
    mine = make_tier(redis_url)
    other_ns = f"{namespace}x"  # shares the prefix but not the namespace
    glob_ns = f"{namespace}[*]"  # glob characters must be matched literally
    other = make_tier(redis_url, namespace=other_ns)
    globby = make_tier(redis_url, namespace=glob_ns)
    await mine.set_many({f"{namespace}:fp:{i}": b"v" for i in range(1200)})
    await other.set_many({f"{other_ns}:fp:1": b"v"})
    await globby.set_many({f"{glob_ns}:fp:1": b"v"})
    await globby.clear()
    assert await raw.exists(f"{namespace}:fp:1", f"{other_ns}:fp:1") == 2
    await mine.clear()
    assert [k async for k in raw.scan_iter(match=f"{namespace}:*")] == []
    assert await raw.exists(f"{other_ns}:fp:1") == 1


@pytest.mark.redis
async def test_tiered_cache_promotes_redis_hits_into_l1(
    make_tier: Callable[..., RedisTier], namespace: str, redis_url: str
) -> None:
    l2 = make_tier(redis_url)
    key = f"{namespace}:fp:a"
    await l2.set_many({key: value(1)})
    cache = TieredCache(MemoryTier(1 << 20), l2)
    assert await cache.get_many([key, f"{namespace}:fp:b"]) == [(value(1), "l2"), None]
    assert await cache.get_many([key]) == [(value(1), "l1")]
    await cache.set_many({f"{namespace}:fp:c": value(3)})
    assert await l2.get_many([f"{namespace}:fp:c"]) == [value(3)]  # written through


@pytest.mark.redis
async def test_open_cache_uses_redis_when_configured(namespace: str, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, cache=CacheSettings(namespace=namespace))
    cache = await open_cache(settings)
    try:
        assert isinstance(cache.l2, RedisTier)
        await cache.set_many({f"{namespace}:fp:a": value(1)})
        [stored] = await cache.l2.get_many([f"{namespace}:fp:a"])
        assert stored is not None and len(stored) == 1489  # packed in L2
        assert unpack_many([stored]) == [value(1)]
    finally:
        await cache.clear()
        await cache.close()


@pytest.mark.redis
async def test_a_paused_server_costs_bounded_misses_then_caching_resumes(
    private_redis: RedisServer, make_tier: Callable[..., RedisTier], namespace: str
) -> None:
    tier = make_tier(private_redis.url, **FAST)
    keys = [f"{namespace}:fp:{i}" for i in range(300)]
    await tier.set_many({k: value(i) for i, k in enumerate(keys)})
    assert await tier.get_many(keys[:2]) == [value(0), value(1)]
    before = errors_total()

    private_redis.pause()
    try:
        for _ in range(2):  # breaker_failures
            result, elapsed = await timed(tier.get_many(keys))
            assert result == [None] * len(keys)
            assert elapsed < BOUND
        assert tier.breaker.state == "open"
        assert not await tier.ping()
        # While open, Redis is not even tried.
        _, elapsed = await timed(tier.set_many({keys[0]: value(99)}))
        assert elapsed < 0.05
        result, elapsed = await timed(tier.get_many(keys))
        assert result == [None] * len(keys) and elapsed < 0.05
        assert errors_total() - before == 4
        assert not (await tier.stats()).healthy
    finally:
        private_redis.resume()

    await asyncio.sleep(FAST["breaker_reset_seconds"] + 0.1)
    # The half-open probe succeeds, and every value is the right one (no stale replies
    # from the requests that timed out).
    assert await tier.get_many(keys) == [value(i) for i in range(300)]
    assert tier.breaker.is_closed and (await tier.stats()).healthy
    await tier.set_many({keys[0]: value(42)})
    assert await tier.get_many(keys[:1]) == [value(42)]


@pytest.mark.redis
async def test_a_fresh_client_against_a_paused_server_is_bounded(
    private_redis: RedisServer, make_tier: Callable[..., RedisTier], namespace: str
) -> None:
    private_redis.pause()
    try:
        tier = make_tier(private_redis.url, **FAST)  # connects during the pause
        _, elapsed = await timed(tier.set_many({f"{namespace}:fp:a": b"v"}))
        assert elapsed < BOUND
        result, elapsed = await timed(tier.get_many([f"{namespace}:fp:a"]))
        assert result == [None] and elapsed < BOUND
    finally:
        private_redis.resume()


@pytest.mark.redis
async def test_a_killed_and_restarted_server_is_used_again(
    private_redis: RedisServer, make_tier: Callable[..., RedisTier], namespace: str
) -> None:
    tier = make_tier(private_redis.url, **FAST)
    keys = [f"{namespace}:fp:{i}" for i in range(10)]
    # Several pooled connections, all of which the kill leaves dead.
    await asyncio.gather(*(tier.set_many({k: value(i)}) for i, k in enumerate(keys)))
    assert await tier.get_many(keys) == [value(i) for i in range(10)]

    private_redis.stop()
    for _ in range(3):
        result, elapsed = await timed(tier.get_many(keys))
        assert result == [None] * 10 and elapsed < BOUND
    assert tier.breaker.state == "open"

    private_redis.start()  # same port, empty (no persistence)
    await asyncio.sleep(FAST["breaker_reset_seconds"] + 0.1)
    await tier.set_many({k: value(i) for i, k in enumerate(keys)})
    assert tier.breaker.is_closed
    assert await tier.get_many(keys) == [value(i) for i in range(10)]


@pytest.mark.redis
async def test_redis_cluster_with_slot_aware_multi_gets(
    redis_cluster: RedisClusterServers, make_tier: Callable[..., RedisTier], namespace: str
) -> None:
    tier = make_tier(redis_cluster.url, ttl_seconds=100)
    assert type(tier.client).__name__ == "RedisCluster"
    keys = [f"{namespace}:fp:{i}" for i in range(600)]  # spread over every node
    await tier.set_many({k: value(i) for i, k in enumerate(keys)})
    assert await tier.get_many([*keys, f"{namespace}:fp:missing"]) == [
        *(value(i) for i in range(600)),
        None,
    ]
    assert tier.errors == 0 and await tier.ping()
    await tier.clear()
    assert await tier.get_many(keys[:50]) == [None] * 50


@pytest.mark.redis
async def test_a_cached_384_d_vector_costs_redis_under_2_kib(private_redis: RedisServer) -> None:
    """INFO used_memory growth per entry over 400 real entries (real keys, default TTL),
    written through the tiered cache as the service writes them: 2,112 B before the L2
    packing (the 1,536-byte value sat in jemalloc's 1,792-byte class)."""
    entries = 400
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((entries, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    settings = CacheSettings()
    keys = [cache_key(settings.namespace, "0123456789abcdef", f"text {i}") for i in range(entries)]
    probe = Redis.from_url(private_redis.url)
    try:
        before = int((await probe.info("memory"))["used_memory"])
        cache = TieredCache(MemoryTier(1 << 20), RedisTier.from_url(private_redis.url, settings))
        try:
            await cache.set_many(
                {k: vector_to_bytes(v) for k, v in zip(keys, vectors, strict=True)}
            )
            await cache.l1.clear()
            found = await cache.get_many(keys)
        finally:
            await cache.close()  # its connection buffers are not the entries' cost
        after = int((await probe.info("memory"))["used_memory"])
        assert await probe.ttl(keys[0]) > 0
    finally:
        await probe.aclose()
    assert [hit for hit in found if hit is not None and hit[1] == "l2"] == [
        (vector_to_bytes(v), "l2") for v in vectors
    ]
    assert (after - before) / entries < 2048
