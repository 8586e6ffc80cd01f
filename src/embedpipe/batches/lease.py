"""Leases for running chunks on the Redis broker: a dead worker's chunk runs again within a
lease, a slow chunk on a live worker never runs twice.

The Redis broker (kombu) keeps each delivered, unacknowledged message in a sorted set
(``unacked_index``) scored by its delivery time; any consumer re-queues a message whose score
is older than the visibility timeout. embedpipe makes that score a lease: the visibility
timeout is short (``EMBEDPIPE_JOBS__VISIBILITY_TIMEOUT_SECONDS``, 30 s), and while a task
runs, its worker moves the score to "now" every third of it. A killed worker stops renewing,
so its message is re-queued one lease later by any worker, or by the API's sweep
(:func:`requeue_lapsed`). RabbitMQ needs none of this: it re-queues unacknowledged work the
moment the consumer's connection drops.

    with ChunkLease.hold(settings, delivery_tag):
        ...  # the chunk's work
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis

from embedpipe.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("embedpipe.batches")

# kombu's Redis transport keys (its defaults; embedpipe sets no key prefix).
UNACKED_INDEX_KEY = "unacked_index"


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://", "redis+socket://"))


def transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis transport options: the lease is the visibility timeout, and consumers
    sweep for lapsed leases several times per lease (not kombu's default ~100 s)."""
    lease = settings.jobs.visibility_timeout_seconds
    return {
        "visibility_timeout": lease,
        "unacked_restore_interval": max(1, lease // 6),
        "unacked_restore_throttle": 1,
        # A process that died holding the sweep's mutex blocks sweeps this long at most.
        "unacked_mutex_expire": lease,
    }


class ChunkLease:
    """Renews one task's lease from a thread of its own until the task is done."""

    def __init__(self, client: redis.Redis, delivery_tag: str, lease_seconds: float) -> None:
        self._client = client
        self._tag = delivery_tag
        self._every = max(0.5, lease_seconds / 3)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="embedpipe-lease", daemon=True)

    @classmethod
    @contextmanager
    def hold(
        cls, client: redis.Redis | None, delivery_tag: str | None, lease: float
    ) -> Iterator[None]:
        """Keep ``delivery_tag`` leased while the block runs (nothing without a Redis broker)."""
        if client is None or not delivery_tag:
            yield
            return
        holder = cls(client, delivery_tag, lease)
        holder._thread.start()
        try:
            yield
        finally:
            holder._done.set()
            holder._thread.join(timeout=10)

    def _renew(self) -> None:
        while not self._done.wait(self._every):
            try:
                # XX: only while the message is still unacknowledged (never re-adds one).
                self._client.zadd(UNACKED_INDEX_KEY, {self._tag: time.time()}, xx=True)
            except redis.RedisError:
                # A broker blip: the next renewal may still come within the lease.
                log.warning("could not renew the lease of task %s", self._tag, exc_info=True)


def requeue_lapsed(celery: Celery) -> None:
    """Re-queue messages whose lease lapsed (their worker died): what every idle worker
    does too; the API runs it so a job moves on while all workers are busy or gone."""
    with celery.connection_for_write() as connection:
        channel: Any = connection.default_channel
        channel.qos.restore_visible(num=None, interval=1)
