"""The rate limiter: ONE behaviour suite over both storages (limits' memory storage, and real
Redis), then what Redis alone must do: hold one budget for several replicas, on its own clock,
and fail open or closed when it is gone."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection

from embedpipe import metrics
from embedpipe.api.security import _duration, rate_limit_headers
from embedpipe.ratelimit import (
    Decision,
    LimiterUnavailable,
    MemoryBackend,
    Quota,
    RateLimiter,
    RedisBackend,
    Window,
)
from embedpipe.settings import SecuritySettings, Settings
from tests.redis_server import RedisClusterServers, RedisServer, find_redis_server

Factory = Callable[[], RateLimiter]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def replicas(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Factory]:
    """Makes limiters that share one storage, as replicas do (memory: one shared backend)."""
    made: list[RateLimiter] = []
    shared = MemoryBackend() if request.param == "memory" else None
    url = request.getfixturevalue("redis_url") if shared is None else ""

    def make() -> RateLimiter:
        if shared is not None:
            limiter = RateLimiter(shared)
        else:
            # Generous bounds: this suite is about behaviour, and the machine may be busy (the
            # short production timeouts have their own tests below).
            limiter = RateLimiter(RedisBackend(url, namespace, 5.0, 5.0), deadline=10.0)
        made.append(limiter)
        return limiter

    yield make
    closed = set()
    for limiter in made:
        if id(limiter.storage) not in closed:
            closed.add(id(limiter.storage))
            await limiter.close()


def _window(decision: Decision, kind: str) -> Window:
    return next(window for window in decision.windows if window.kind == kind)


async def test_requests_per_minute(replicas: Factory) -> None:
    limiter = replicas()
    quota = Quota(requests=3, tokens=0)
    decisions = [await limiter.acquire("alice", quota, 10) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [_window(d, "requests").remaining for d in decisions] == [2, 1, 0, 0, 0]
    assert all(len(d.windows) == 1 for d in decisions)  # no token budget, no token window
    refused = decisions[-1]
    assert _window(refused, "requests").exceeded
    assert 55 < refused.retry_after <= 60
    assert 55 < _window(decisions[0], "requests").reset_seconds <= 60


async def test_a_refused_request_consumes_neither_budget(replicas: Factory) -> None:
    limiter = replicas()
    quota = Quota(requests=3, tokens=50)
    first = await limiter.acquire("bob", quota, 30)
    assert first.allowed
    assert (_window(first, "requests").remaining, _window(first, "tokens").remaining) == (2, 20)
    # Fits the requests, not the tokens: refused, and charged to neither.
    refused = await limiter.acquire("bob", quota, 30)
    assert not refused.allowed
    assert _window(refused, "tokens").exceeded and not _window(refused, "requests").exceeded
    assert (_window(refused, "requests").remaining, _window(refused, "tokens").remaining) == (2, 20)
    # What still fits is served from the untouched budgets.
    fits = await limiter.acquire("bob", quota, 20)
    assert fits.allowed
    assert (_window(fits, "requests").remaining, _window(fits, "tokens").remaining) == (1, 0)
    assert not (await limiter.acquire("bob", quota, 1)).allowed
    last = await limiter.acquire("bob", quota, 0)
    assert last.allowed and _window(last, "requests").remaining == 0
    # Now the requests are spent: refused, and the (empty) token budget is not charged.
    spent = await limiter.acquire("bob", quota, 0)
    assert not spent.allowed and _window(spent, "requests").exceeded


async def test_clients_have_their_own_budgets(replicas: Factory) -> None:
    limiter = replicas()
    quota = Quota(requests=2, tokens=100)
    for _ in range(2):
        assert (await limiter.acquire("carol", quota, 5)).allowed
    assert not (await limiter.acquire("carol", quota, 5)).allowed
    other = await limiter.acquire("dave", quota, 5)
    assert other.allowed and _window(other, "requests").remaining == 1
    # A different limit is a different budget too (as in limits' key layout).
    assert (await limiter.acquire("carol", Quota(requests=5, tokens=100), 5)).allowed


async def test_equal_limits_for_requests_and_tokens_do_not_share_a_counter(
    replicas: Factory,
) -> None:
    limiter = replicas()
    decision = await limiter.acquire("erin", Quota(requests=10, tokens=10), 4)
    assert (_window(decision, "requests").remaining, _window(decision, "tokens").remaining) == (
        9,
        6,
    )


async def test_no_budget_no_storage(replicas: Factory) -> None:
    decision = await replicas().acquire("frank", Quota(requests=0, tokens=0), 10**9)
    assert decision.allowed and decision.windows == () and not decision.degraded


async def test_concurrent_requests_on_several_replicas_never_overspend(
    replicas: Factory,
) -> None:
    limiters = [replicas(), replicas()]
    quota = Quota(requests=10, tokens=1000)
    decisions = await asyncio.gather(
        *(limiters[i % 2].acquire("grace", quota, 7) for i in range(40))
    )
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 10
    assert sorted(_window(d, "requests").remaining for d in allowed) == list(range(10))
    assert sorted(_window(d, "tokens").remaining for d in allowed) == [
        1000 - 7 * n for n in range(10, 0, -1)
    ]


async def test_limits_reads_the_same_counters(replicas: Factory) -> None:
    limiter = replicas()
    quota = Quota(requests=10, tokens=100)
    for _ in range(3):
        await limiter.acquire("heidi", quota, 11)
    reader = FixedWindowRateLimiter(limiter.storage)
    identifier = limiter.identifier("heidi")
    requests = await reader.get_window_stats(limiter.item("requests", 10), identifier)
    tokens = await reader.get_window_stats(limiter.item("tokens", 100), identifier)
    assert (requests.remaining, tokens.remaining) == (7, 67)
    assert 55 < requests.reset_time - time.time() <= 61


async def test_refusals_are_counted_by_limit(replicas: Factory) -> None:
    def count(limit: str) -> float:
        value: float = metrics.RATE_LIMITED.labels(limit=limit)._value.get()
        return value

    before = count("requests"), count("tokens")
    limiter = replicas()
    await limiter.acquire("ivan", Quota(requests=1, tokens=10), 5)
    await limiter.acquire("ivan", Quota(requests=1, tokens=10), 5)  # requests
    await limiter.acquire("judy", Quota(requests=5, tokens=10), 11)  # tokens
    assert (count("requests"), count("tokens")) == (before[0] + 1, before[1] + 1)


# --- Redis only ---


@pytest.mark.redis
async def test_windows_run_on_redis_clock(redis_url: str, namespace: str) -> None:
    limiter = RateLimiter(RedisBackend(redis_url, namespace, 5.0, 5.0), deadline=10.0)
    client: Redis = Redis.from_url(redis_url)
    try:
        quota = Quota(requests=2, tokens=0)
        assert (await limiter.acquire("kim", quota, 1)).allowed
        assert (await limiter.acquire("kim", quota, 1)).allowed
        assert not (await limiter.acquire("kim", quota, 1)).allowed
        key = f"{namespace}:" + limiter.item("requests", 2).key_for(limiter.identifier("kim"))
        assert await client.get(key) == b"2"
        # The window is Redis's key TTL: when Redis expires it, every replica sees a new one.
        assert 59_000 < await client.pttl(key) <= 60_000
        await client.pexpire(key, 20)
        await asyncio.sleep(0.1)
        fresh = await limiter.acquire("kim", quota, 1)
        assert fresh.allowed and _window(fresh, "requests").remaining == 1
    finally:
        await client.aclose()
        await limiter.close()


@pytest.mark.redis
async def test_redis_down_fails_open_with_a_log_line_and_a_metric(
    private_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RateLimiter(
        RedisBackend(private_redis.url, namespace, 0.2, 0.2), retry_seconds=0.5, deadline=0.5
    )
    quota = Quota(requests=1, tokens=0)
    try:
        assert (await limiter.acquire("liz", quota, 1)).allowed
        assert not (await limiter.acquire("liz", quota, 1)).allowed
        errors = metrics.RATE_LIMITER_ERRORS._value.get()
        private_redis.stop()
        started = time.monotonic()
        decision = await limiter.acquire("liz", quota, 1)
        assert decision.allowed and decision.degraded and decision.windows == ()
        # Within retry_seconds the storage is not even tried: no second timeout.
        assert (await limiter.acquire("liz", quota, 1)).degraded
        assert time.monotonic() - started < 1.0
        assert metrics.RATE_LIMITER_ERRORS._value.get() == errors + 2
        assert "failing open" in caplog.text
        private_redis.start()  # empty: the budget starts again
        await asyncio.sleep(0.6)
        assert (await limiter.acquire("liz", quota, 1)).allowed
        back = await limiter.acquire("liz", quota, 1)
        assert not back.allowed and not back.degraded
        assert "answers again" in caplog.text
    finally:
        await limiter.close()


@pytest.mark.redis
async def test_redis_hung_fails_closed_when_configured(
    private_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    limiter = RateLimiter(
        RedisBackend(private_redis.url, namespace, 0.2, 0.2),
        fail_closed=True,
        retry_seconds=5,
        deadline=0.4,
    )
    try:
        assert (await limiter.acquire("mia", Quota(requests=5, tokens=0), 1)).allowed
        private_redis.pause()
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await limiter.acquire("mia", Quota(requests=5, tokens=0), 1)
        assert time.monotonic() - started < 1.5  # bounded by the deadline, not redis-py
        with pytest.raises(LimiterUnavailable):
            await limiter.acquire("mia", Quota(requests=5, tokens=0), 1)
        assert "failing closed" in caplog.text
        # Nothing to decide means nothing to fail.
        assert (await limiter.acquire("mia", Quota(requests=0, tokens=0), 1)).allowed
    finally:
        private_redis.resume()
        await limiter.close()


# --- the answer's headers ---


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0ms"), (0.0204, "20ms"), (1, "1s"), (1.5, "1.5s"), (59.9996, "1m0s"), (360, "6m0s")],
)
def test_durations_look_like_openais(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_headers_of_a_refusal() -> None:
    decision = Decision(
        allowed=False,
        windows=(
            Window("requests", 10, 4, 12.25, exceeded=False),
            Window("tokens", 1000, 20, 41.2, exceeded=True),
        ),
    )
    assert rate_limit_headers(decision) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "12.25s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "20",
        "x-ratelimit-reset-tokens": "41.2s",
        "Retry-After": "42",
        "retry-after-ms": "41200",
    }
    assert rate_limit_headers(Decision(allowed=True)) == {}


async def test_settings_choose_the_storage(tmp_path: Path) -> None:
    memory = RateLimiter.from_settings(Settings(data_dir=tmp_path))
    assert isinstance(memory.storage, MemoryStorage) and not memory.fail_closed
    redis = RateLimiter.from_settings(
        Settings(
            data_dir=tmp_path,
            redis_url="redis://127.0.0.1:1/0",
            security=SecuritySettings(fail_closed=True),
        )
    )
    assert isinstance(redis.storage, RedisStorage) and redis.fail_closed
    await memory.close()
    await redis.close()


@pytest.mark.redis
async def test_redis_cluster_keeps_a_clients_windows_in_one_slot(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The script touches both windows of a client at once: on a cluster they must share a
    slot (the identifier's hash tag), or Redis refuses with CROSSSLOT."""
    if find_redis_server() is None:
        pytest.skip("redis-server not found")
    with RedisClusterServers(tmp_path_factory.mktemp("cluster")) as cluster:
        cluster.start()
        limiter = RateLimiter(RedisBackend(cluster.url, "cl", 5.0, 5.0), deadline=10.0)
        try:
            quota = Quota(requests=2, tokens=100)
            for client in ("a", "b", "c", "d", "e"):  # spread over the three shards
                first = await limiter.acquire(client, quota, 30)
                assert first.allowed and not first.degraded, client
                assert (await limiter.acquire(client, quota, 30)).allowed
                refused = await limiter.acquire(client, quota, 30)
                assert not refused.allowed and not refused.degraded
                assert _window(refused, "tokens").remaining == 40
        finally:
            await limiter.close()


@pytest.mark.parametrize(("scheme", "tls"), [("rediss", True), ("redis", False)])
async def test_a_cluster_url_keeps_its_tls_and_credentials(scheme: str, tls: bool) -> None:
    """limits builds the cluster client from the address alone; TLS must not be lost on the
    way (nothing connects here: cluster clients connect on first use)."""
    backend = RedisBackend(f"{scheme}://user:secret@10.0.0.1:7000/0?cluster=true", "cl", 1.0, 1.0)
    try:
        connection = backend._client.nodes_manager.connection_kwargs  # type: ignore[union-attr]
        assert issubclass(connection["connection_class"], SSLConnection) is tls
        assert (connection["username"], connection["password"]) == ("user", "secret")
    finally:
        await backend.close()
