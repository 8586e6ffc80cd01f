"""The circuit breaker, driven by a fake clock."""

from __future__ import annotations

import logging
import uuid

import pytest
from prometheus_client import REGISTRY

from embedpipe.cache.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(tier: str) -> float | None:
    return REGISTRY.get_sample_value("embedpipe_cache_breaker_open", {"tier": tier})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tier() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # a gauge series of this test's own


def test_opens_after_n_consecutive_failures(clock: FakeClock, tier: str) -> None:
    breaker = CircuitBreaker(failures=3, reset_seconds=5.0, tier=tier, clock=clock)
    assert gauge(tier) == 0
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not consecutive any more
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow() and breaker.is_closed
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert gauge(tier) == 1


def test_lets_one_probe_through_after_the_reset_period(clock: FakeClock, tier: str) -> None:
    breaker = CircuitBreaker(failures=1, reset_seconds=5.0, tier=tier, clock=clock)
    breaker.record_failure()
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open"
    assert not breaker.allow()  # everyone else still skips
    assert gauge(tier) == 1


def test_probe_success_closes(clock: FakeClock, tier: str) -> None:
    breaker = CircuitBreaker(failures=1, reset_seconds=5.0, tier=tier, clock=clock)
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()
    breaker.record_success()
    assert breaker.is_closed and breaker.allow()
    assert gauge(tier) == 0


def test_probe_failure_reopens_for_a_full_period(clock: FakeClock, tier: str) -> None:
    breaker = CircuitBreaker(failures=2, reset_seconds=5.0, tier=tier, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()
    clock.now += 1
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_a_lost_probe_does_not_keep_it_half_open_forever(clock: FakeClock, tier: str) -> None:
    breaker = CircuitBreaker(failures=1, reset_seconds=5.0, tier=tier, clock=clock)
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()  # this probe's caller is cancelled and never reports
    clock.now += 5
    assert breaker.allow()


def test_logs_one_line_on_open_and_one_on_close(
    clock: FakeClock, tier: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="embedpipe.cache")
    breaker = CircuitBreaker(failures=2, reset_seconds=5.0, tier=tier, clock=clock)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 5
    breaker.allow()
    breaker.record_failure()  # a failed probe: not another warning
    clock.now += 5
    breaker.allow()
    breaker.record_success()
    breaker.record_success()
    records = [(r.levelno, r.name) for r in caplog.records if r.levelno >= logging.INFO]
    assert records == [(logging.WARNING, "embedpipe.cache"), (logging.INFO, "embedpipe.cache")]


def test_rejects_a_zero_threshold() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0, reset_seconds=1.0, tier="x")
