"""A circuit breaker for a dependency that may fail (the cache Redis, an upstream API).

closed --N consecutive failures--> open --reset_seconds--> half-open (ONE probe goes through)
half-open --probe succeeds--> closed;  half-open --probe fails--> open again.

While open, callers skip the dependency entirely, so a dead or hung Redis costs a request
nothing instead of a timeout each time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from prometheus_client import Gauge

from embedpipe.metrics import CACHE_BREAKER_OPEN

logger = logging.getLogger("embedpipe.cache")

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Counts consecutive failures of one cache tier and decides whether to try it.

    >>> breaker = CircuitBreaker(failures=3, reset_seconds=5.0, tier="l2")
    >>> if breaker.allow():
    ...     breaker.record_success()  # or record_failure() when the call failed
    """

    def __init__(
        self,
        failures: int,
        reset_seconds: float,
        tier: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        gauge: Gauge | None = None,
        subject: str | None = None,
    ) -> None:
        """``gauge``/``subject``: the 0/1 gauge and the name in log lines, for a dependency
        other than a cache tier (default: the cache tier's)."""
        if failures < 1:
            raise ValueError("failures must be >= 1")
        self.failures = failures
        self.reset_seconds = reset_seconds
        self.tier = tier
        self._clock = clock
        self._state: State = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_at = 0.0
        self._gauge = gauge if gauge is not None else CACHE_BREAKER_OPEN.labels(tier=tier)
        self._subject = subject or f"cache tier {tier}"
        self._gauge.set(0)

    @property
    def state(self) -> State:
        return self._state

    @property
    def is_closed(self) -> bool:
        return self._state == "closed"

    def allow(self) -> bool:
        """True when the caller may use the dependency now (and must then record the outcome)."""
        if self._state == "closed":
            return True
        now = self._clock()
        if self._state == "open":
            if now - self._opened_at < self.reset_seconds:
                return False
            self._state = "half_open"
            self._probe_at = now
            return True
        # Half-open: one probe is out. If its caller never reported (it was cancelled), let
        # another one go after a reset period instead of staying half-open forever.
        if now - self._probe_at >= self.reset_seconds:
            self._probe_at = now
            return True
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        if self._state != "closed":
            self._state = "closed"
            self._gauge.set(0)
            logger.info("%s: circuit breaker closed, back in use", self._subject)

    def record_failure(self) -> None:
        self._consecutive += 1
        if self._state == "half_open":
            # The probe failed: wait another full period before the next one.
            self._state = "open"
            self._opened_at = self._clock()
            logger.debug("%s: probe failed, circuit breaker stays open", self._subject)
        elif self._state == "closed" and self._consecutive >= self.failures:
            self._state = "open"
            self._opened_at = self._clock()
            self._gauge.set(1)
            logger.warning(
                "%s: circuit breaker open after %d consecutive failures; skipping it for %.1fs",
                self._subject,
                self._consecutive,
                self.reset_seconds,
            )
