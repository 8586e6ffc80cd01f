"""The Redis broker's chunk lease against a real Redis: a running task's lease is renewed,
a finished (acknowledged) one is never re-added, and the Celery configuration per broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
import redis

from embedpipe.batches.celery_app import create_celery
from embedpipe.batches.lease import UNACKED_INDEX_KEY, ChunkLease, transport_options
from embedpipe.batches.wiring import open_store
from embedpipe.settings import JobsSettings, Settings

pytestmark = [pytest.mark.redis]


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_held_lease_is_renewed_and_an_acknowledged_one_is_never_re_added(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    held, acked = f"held-{uuid.uuid4().hex}", f"acked-{uuid.uuid4().hex}"
    stale = time.time() - 100
    client.zadd(UNACKED_INDEX_KEY, {held: stale})
    try:
        with ChunkLease.hold(client, held, 3), ChunkLease.hold(client, acked, 3):
            # Renewed every second: the score moves to "now" while the task runs.
            _wait_until(
                lambda: (client.zscore(UNACKED_INDEX_KEY, held) or 0) > time.time() - 5,
                "the lease was never renewed",
            )
        assert client.zscore(UNACKED_INDEX_KEY, acked) is None  # XX: never re-added
    finally:
        client.zrem(UNACKED_INDEX_KEY, held, acked)
        client.close()


def test_the_redis_broker_sweeps_lapsed_leases_often_and_rabbitmq_needs_none(
    redis_url: str,
) -> None:
    settings = Settings(redis_url=redis_url)
    assert settings.jobs.visibility_timeout_seconds == 30  # the default lease
    options = transport_options(settings)
    assert options["visibility_timeout"] == 30
    assert options["unacked_restore_interval"] == 5 and options["unacked_restore_throttle"] == 1
    assert create_celery(settings).conf.broker_transport_options == options
    amqp = Settings(redis_url=redis_url, broker_url="amqp://guest:guest@127.0.0.1:1//")
    assert create_celery(amqp).conf.broker_transport_options == {}
    with pytest.raises(ValueError):
        JobsSettings(visibility_timeout_seconds=2)


async def test_with_rabbitmq_job_state_lives_in_the_redis_url(redis_url: str) -> None:
    amqp = Settings(redis_url=redis_url, broker_url="amqp://guest:guest@127.0.0.1:1//")
    store = open_store(amqp)
    try:
        assert await store.get_batch(f"batch_{uuid.uuid4().hex}") is None  # Redis answers
    finally:
        await store.close()
