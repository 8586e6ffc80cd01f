"""Per-client budgets of requests and tokens per minute (OpenAI's RPM and TPM), held across
replicas. A thin layer over the ``limits`` library; it knows nothing about HTTP.

Each budget is a fixed window of one minute that starts with the client's first request (limits'
fixed-window strategy): in memory in the embedded mode, in Redis when ``EMBEDPIPE_REDIS_URL`` is
set, where every replica shares it and windows start and expire on Redis's clock (a key TTL), not
on any replica's.

A request is charged only if it fits BOTH budgets: one refused for tokens must not eat a request
slot, nor the reverse. limits checks and charges one item at a time, which cannot give that across
replicas: ``test()`` both then ``hit()`` both leaves a gap in which another replica charges too,
and ``FixedWindowRateLimiter.hit()`` increments even when it refuses (a refused 5,000-token
request would spend the budget it was refused for). So on Redis one small Lua script checks every
window and charges all or none, atomically, on limits' own key layout (``limits`` reads the same
counters: ``FixedWindowRateLimiter(limiter.storage).get_window_stats(...)``). In memory one
process is the whole world: ``test()`` each, then ``hit()`` each, under one lock.

When the storage fails, the limiter fails open (requests pass, unlimited) or, configured so,
closed (:class:`LimiterUnavailable`); either way with a log line and a metric, and it skips the
storage for ``retry_seconds`` before trying again, so an outage costs one short timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import FixedWindowRateLimiter
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from embedpipe import metrics
from embedpipe.cache.redis import split_cluster_flag
from embedpipe.settings import Settings

log = logging.getLogger("embedpipe.ratelimit")

Kind = Literal["requests", "tokens"]
WINDOW_SECONDS = 60
_EXPECTED_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

# Fixed windows on Redis's clock, checked together and charged together (see the docstring).
# KEYS[i]: the counter of window i. ARGV[1]: the window in ms; ARGV[2i], ARGV[2i+1]: the limit
# and the cost of window i. Returns {allowed, count_1, pttl_1, ...}: each count after charging
# (as it was, when refused) and the ms left in its window (0: not started).
_CHARGE_ALL_OR_NONE = """
local window = tonumber(ARGV[1])
local counts = {}
local allowed = 1
for i = 1, #KEYS do
    counts[i] = tonumber(redis.call('GET', KEYS[i]) or 0)
    if counts[i] + tonumber(ARGV[2 * i + 1]) > tonumber(ARGV[2 * i]) then
        allowed = 0
    end
end
local reply = {allowed}
for i = 1, #KEYS do
    if allowed == 1 then
        counts[i] = redis.call('INCRBY', KEYS[i], ARGV[2 * i + 1])
    end
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl == -1 then
        redis.call('PEXPIRE', KEYS[i], window)
        ttl = window
    elseif ttl < 0 then
        ttl = 0
    end
    reply[#reply + 1] = counts[i]
    reply[#reply + 1] = ttl
end
return reply
"""


@dataclass(frozen=True, slots=True)
class Quota:
    """A client's budgets per minute; 0 = unlimited."""

    requests: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Window:
    """One budget after a decision: what is left and when it is whole again."""

    kind: Kind
    limit: int
    remaining: int
    reset_seconds: float  # 0 while the window has not started
    exceeded: bool


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    windows: tuple[Window, ...] = ()  # empty: no budget applies, or the storage failed open
    degraded: bool = False  # decided without the storage (it failed; fail-open)

    @property
    def retry_after(self) -> float:
        """Seconds until every exceeded budget is whole again."""
        return max((w.reset_seconds for w in self.windows if w.exceeded), default=0.0)


class LimiterUnavailable(Exception):
    """The storage failed and the limiter is configured to fail closed."""


class _Backend(Protocol):
    @property
    def storage(self) -> MemoryStorage | RedisStorage: ...

    async def charge(
        self, windows: Sequence[tuple[RateLimitItem, int]], identifier: str
    ) -> tuple[bool, list[tuple[int, float]]]:
        """Charge every window its cost, or none; (allowed, [(remaining, reset s), ...])."""
        ...

    async def close(self) -> None: ...


class MemoryBackend:
    """One process's budgets: limits' memory storage and fixed-window strategy."""

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        self._limiter = FixedWindowRateLimiter(self.storage)
        # test() and hit() await; without the lock two requests could pass test() together.
        self._lock = asyncio.Lock()

    async def charge(
        self, windows: Sequence[tuple[RateLimitItem, int]], identifier: str
    ) -> tuple[bool, list[tuple[int, float]]]:
        async with self._lock:
            allowed = True
            for item, cost in windows:
                allowed &= await self._limiter.test(item, identifier, cost=cost)
            if allowed:
                for item, cost in windows:
                    await self._limiter.hit(item, identifier, cost=cost)
            states = []
            for item, _ in windows:
                stats = await self._limiter.get_window_stats(item, identifier)
                states.append((stats.remaining, max(0.0, stats.reset_time - time.time())))
        return allowed, states

    async def close(self) -> None:
        timer = self.storage.timer  # limits' expiry task, started by the first hit
        if timer is not None and not timer.done():
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)


class RedisBackend:
    """Budgets shared by every replica: limits' Redis storage (redis-py) and one Lua script."""

    def __init__(self, url: str, key_prefix: str, socket_timeout: float, connect_timeout: float):
        url, cluster = split_cluster_flag(url)
        # Short timeouts and no client-side retries, as for the cache tier: redis-py's defaults
        # can hold a request for a minute against a hung server.
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        self.storage: RedisStorage
        if cluster:
            # limits takes only the address from this URL: TLS has to be passed on by hand.
            options["ssl"] = url.startswith("rediss://")
            address = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
            self.storage = RedisClusterStorage(
                f"async+redis+cluster://{address}",
                implementation="redispy",
                key_prefix=key_prefix,
                **options,
            )
        else:
            options["health_check_interval"] = 0
            self.storage = RedisStorage(
                "async+" + url, implementation="redispy", key_prefix=key_prefix, **options
            )
        bridge = cast(RedispyBridge, self.storage.bridge)
        self._client = cast(Redis | RedisCluster, bridge.get_connection())
        self._script = self._client.register_script(_CHARGE_ALL_OR_NONE)

    async def charge(
        self, windows: Sequence[tuple[RateLimitItem, int]], identifier: str
    ) -> tuple[bool, list[tuple[int, float]]]:
        keys = [self.storage.bridge.prefixed_key(item.key_for(identifier)) for item, _ in windows]
        args: list[int] = [WINDOW_SECONDS * 1000]
        for item, cost in windows:
            args += [item.amount, cost]
        reply = await self._script(keys=keys, args=args)
        states = [
            (item.amount - int(reply[1 + 2 * i]), int(reply[2 + 2 * i]) / 1000)
            for i, (item, _) in enumerate(windows)
        ]
        return bool(reply[0]), states

    async def close(self) -> None:
        await self._client.aclose()


class RateLimiter:
    """Decides whether a client's request fits its budgets, and charges it if so.

    >>> limiter = RateLimiter.from_settings(settings)
    >>> decision = await limiter.acquire("key:search-team", Quota(requests=600, tokens=10**6), 42)
    >>> decision.allowed, decision.windows[0].remaining
    (True, 599)
    >>> await limiter.close()
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        fail_closed: bool = False,
        retry_seconds: float = 1.0,
        deadline: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self.fail_closed = fail_closed
        self.retry_seconds = retry_seconds
        self._deadline = deadline
        self._clock = clock
        self._skip_until = 0.0
        self._failing = False
        self._items: dict[tuple[Kind, int], RateLimitItem] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        security = settings.security
        backend: _Backend
        if settings.redis_url:
            backend = RedisBackend(
                settings.redis_url,
                f"{settings.cache.namespace}-ratelimit",
                security.redis_socket_timeout,
                security.redis_connect_timeout,
            )
        else:
            backend = MemoryBackend()
        # The outer bound of one call: connect + one reply, so a hung server cannot add up.
        deadline = max(
            2 * security.redis_socket_timeout,
            security.redis_connect_timeout + security.redis_socket_timeout,
        )
        return cls(
            backend,
            fail_closed=security.fail_closed,
            retry_seconds=security.retry_seconds,
            deadline=deadline,
        )

    @property
    def storage(self) -> MemoryStorage | RedisStorage:
        """limits' storage, for reading the same counters with limits' own strategies."""
        return self._backend.storage

    def item(self, kind: Kind, limit: int) -> RateLimitItem:
        """limits' item for a budget (its key layout is limits' fixed-window one)."""
        key = (kind, limit)
        if key not in self._items:
            self._items[key] = RateLimitItemPerMinute(limit, namespace=kind)
        return self._items[key]

    @staticmethod
    def identifier(client: str) -> str:
        # Hashed: no key names or addresses in Redis; braces: one Redis Cluster slot for all
        # of a client's windows, as the script touches them together.
        return "{" + hashlib.sha256(client.encode()).hexdigest()[:16] + "}"

    async def acquire(self, client: str, quota: Quota, tokens: int) -> Decision:
        """Charge one request of ``tokens`` tokens to ``client`` if it fits every budget.

        Raises LimiterUnavailable only when the storage fails and ``fail_closed`` is set.
        """
        budgets: list[tuple[Kind, int, int]] = [
            ("requests", quota.requests, 1),
            ("tokens", quota.tokens, tokens),
        ]
        kinds = [budget for budget in budgets if budget[1] > 0]
        if not kinds:
            return Decision(allowed=True)
        if self._clock() < self._skip_until:
            return self._without_storage(None)
        windows = [(self.item(kind, limit), cost) for kind, limit, cost in kinds]
        try:
            async with asyncio.timeout(self._deadline):
                allowed, states = await self._backend.charge(windows, self.identifier(client))
        except Exception as exc:
            self._skip_until = self._clock() + self.retry_seconds
            return self._without_storage(exc)
        if self._failing:
            self._failing = False
            log.warning("rate limiter: the storage answers again; limits are enforced")
        decided = tuple(
            Window(
                kind=kind,
                limit=limit,
                remaining=max(0, remaining),
                reset_seconds=reset,
                exceeded=not allowed and remaining < cost,
            )
            for (kind, limit, cost), (remaining, reset) in zip(kinds, states, strict=True)
        )
        if not allowed:
            for window in decided:
                if window.exceeded:
                    metrics.RATE_LIMITED.labels(limit=window.kind).inc()
        return Decision(allowed=allowed, windows=decided)

    def _without_storage(self, exc: Exception | None) -> Decision:
        metrics.RATE_LIMITER_ERRORS.inc()
        mode = "closed: refusing requests" if self.fail_closed else "open: not limiting"
        if exc is not None and not self._failing:
            self._failing = True
            if isinstance(exc, _EXPECTED_ERRORS):
                log.warning("rate limiter: the storage failed (%r); failing %s", exc, mode)
            else:  # a bug rather than an outage: keep the traceback
                log.error("rate limiter: unexpected error; failing %s", mode, exc_info=exc)
        elif exc is not None:
            log.debug("rate limiter: the storage failed again (%r)", exc)
        if self.fail_closed:
            raise LimiterUnavailable("The rate limiter is unavailable.")
        return Decision(allowed=True, degraded=True)

    async def close(self) -> None:
        await self._backend.close()
