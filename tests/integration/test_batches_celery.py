"""Batches on Celery workers (distributed mode), on both brokers (Redis, and RabbitMQ with
job state in Redis), with default timeouts: a worker killed with SIGKILL mid-job and
duplicated chunk tasks still give every custom_id exactly once, with the right vectors, and
the killed worker's chunk runs again within a minute. On Redis a chunk slower than its lease
on a live worker runs once."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from embedpipe.batches.celery_app import create_celery
from embedpipe.batches.runner import CHUNK_TASK
from embedpipe.settings import Settings
from tests.conftest import require_redis_server
from tests.integration.batch_helpers import (
    read_lines,
    request_line,
    submit,
    texts_for,
    vectors_by_custom_id,
    wait_for,
)
from tests.integration.conftest import assert_same_vectors, reference_vectors
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess
from tests.worker_process import WorkerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.redis]


# A dead worker's chunk must run again within this long (the bar), default settings.
REQUEUE_BOUND_SECONDS = 60


@dataclass
class Cluster:
    env: dict[str, str]
    api: ServerProcess
    workers: list[WorkerProcess]
    client: OpenAI

    @property
    def queue(self) -> str:
        return self.env["EMBEDPIPE_JOBS__QUEUE"]

    def settings(self) -> Settings:
        return Settings(
            redis_url=self.env["EMBEDPIPE_REDIS_URL"],
            broker_url=self.env.get("EMBEDPIPE_BROKER_URL", ""),
        )


@contextmanager
def _cluster(root: Path, env: dict[str, str], workers: int = 2) -> Iterator[Cluster]:
    env = {
        "EMBEDPIPE_DATA_DIR": str(root / "data"),
        "EMBEDPIPE_JOBS__QUEUE": f"embedpipe-test-{uuid.uuid4().hex[:8]}",  # this test's own
        **env,
    }
    api = ServerProcess(env, root / "api.log").start()
    started: list[WorkerProcess] = []
    client = OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    try:
        for index in range(workers):
            log = root / f"worker{index}.log"
            started.append(WorkerProcess(env, log, f"w{index}@{root.name}").start())
        yield Cluster(env, api, started, client)
    finally:
        client.close()
        for worker in started:
            worker.stop()
        api.stop()


@pytest.fixture(
    scope="module", params=["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]
)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """An API and two workers with default timeouts, on each broker."""
    require_redis_server()
    root = tmp_path_factory.mktemp(f"celery-{request.param}")
    env = {"EMBEDPIPE_JOBS__CHUNK_SIZE": "25"}
    if request.param == "rabbitmq":
        env["EMBEDPIPE_BROKER_URL"] = request.getfixturevalue("amqp_url")
    with RedisServer.start_new(root / "redis") as redis:
        env["EMBEDPIPE_REDIS_URL"] = redis.url
        with _cluster(root, env) as cluster:
            yield cluster


def _completed(client: OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return counts.completed if counts else 0


def test_a_worker_killed_mid_job_loses_and_duplicates_nothing(
    cluster: Cluster, reference_model: Any
) -> None:
    # The bar: 3,000 inputs through the unmodified SDK, one worker SIGKILLed mid-job.
    texts = texts_for(3000, "sigkill")
    batch = submit(cluster.client, [request_line(key, text) for key, text in texts.items()])
    deadline = time.monotonic() + 120
    window: list[tuple[float, int]] = []  # (when, completed) from the first commits on
    while (done_so_far := _completed(cluster.client, batch.id)) < 300:
        assert time.monotonic() < deadline, "no progress before the kill"
        if done_so_far:
            window.append((time.monotonic(), done_so_far))
        time.sleep(0.2)
    # The pace of two busy workers (model loaded): the one left gets their cores, so it is a
    # fair estimate of how long the remaining work takes.
    started, first = window[0] if window else (time.monotonic() - 1, 0)
    pace = max(done_so_far - first, 25) / max(0.5, time.monotonic() - started)
    victim = cluster.workers[0]
    victim.kill()
    killed = time.monotonic()
    remaining = (3000 - _completed(cluster.client, batch.id)) / pace
    bound = REQUEUE_BOUND_SECONDS + 2 * remaining + 10  # twice the estimate, plus slack
    done = wait_for(cluster.client, batch.id, ("completed", "failed"), timeout=bound)
    print(
        f"{cluster.settings().effective_broker_url.split(':')[0]}: finished "
        f"{time.monotonic() - killed:.1f}s after the kill; remaining work ~{remaining:.1f}s"
    )
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (3000, 0)
    output = read_lines(cluster.client, done.output_file_id)
    assert len(output) == 3000  # nothing twice
    vectors = vectors_by_custom_id(output)
    assert set(vectors) == set(texts)
    keys = list(texts)[::100]
    assert_same_vectors(
        [vectors[key] for key in keys],
        reference_vectors(reference_model, [texts[key] for key in keys]),
    )
    victim.start()  # back for the next test


def test_duplicated_chunk_tasks_change_nothing(cluster: Cluster) -> None:
    texts = texts_for(150, "duplicate")
    items_before = _items_done(cluster)
    batch = submit(cluster.client, [request_line(key, text) for key, text in texts.items()])
    wait_for(cluster.client, batch.id, ("in_progress", "completed"), timeout=120)
    celery = create_celery(cluster.settings())
    try:
        for index in range(150 // 25):  # every chunk once more, as a redelivery would
            celery.send_task(CHUNK_TASK, args=[batch.id, index], queue=cluster.queue)
    finally:
        celery.close()
    done = wait_for(cluster.client, batch.id, ("completed",), timeout=180)
    time.sleep(2)  # let the duplicates run after the batch completed
    output = read_lines(cluster.client, done.output_file_id)
    assert set(vectors_by_custom_id(output)) == set(texts)
    assert cluster.client.batches.retrieve(batch.id).request_counts == done.request_counts
    # Each worker's /metrics counts only the chunks it committed: together, each item once.
    assert _items_done(cluster) - items_before == 150


def _items_done(cluster: Cluster) -> float:
    return sum(
        worker.metric("embedpipe_job_items_total", status="succeeded") for worker in cluster.workers
    )


def test_cancel_on_workers(cluster: Cluster) -> None:
    texts = texts_for(2000, "cancel-celery")
    batch = submit(cluster.client, [request_line(key, text) for key, text in texts.items()])
    wait_for(cluster.client, batch.id, ("in_progress",), timeout=120)
    cluster.client.batches.cancel(batch.id)
    done = wait_for(cluster.client, batch.id, ("cancelled",), timeout=180)
    assert done.request_counts is not None and done.request_counts.completed < 2000
    vectors_by_custom_id(read_lines(cluster.client, done.output_file_id))


def _chunk_runs(workers: list[WorkerProcess], longer_than: float) -> list[float]:
    """Seconds of each run_chunk task the workers finished that took longer than
    ``longer_than`` (a real computation; a chunk found done already returns in ms). Waits
    until every chunk task they received has finished."""
    received = re.compile(r"Task embedpipe\.run_chunk\[[^\]]+\] received")
    finished = re.compile(r"Task embedpipe\.run_chunk\[[^\]]+\] (?:succeeded|raised|retry)")
    took = re.compile(r"Task embedpipe\.run_chunk\[[^\]]+\] succeeded in ([0-9.]+)s")
    deadline = time.monotonic() + 300
    while True:
        logs = [worker.log_path.read_text(errors="replace") for worker in workers]
        if all(len(received.findall(log)) == len(finished.findall(log)) for log in logs):
            break
        assert time.monotonic() < deadline, "a chunk task never finished"
        time.sleep(0.5)
    runs = [float(seconds) for log in logs for seconds in took.findall(log)]
    return [seconds for seconds in runs if seconds > longer_than]


def test_a_chunk_slower_than_its_lease_runs_once_on_a_live_worker(
    redis_url: str, tmp_path: Path
) -> None:
    # Redis broker, a 3 s lease and one chunk of long texts that takes far longer: without
    # renewal the idle second worker (or the API's sweep) would re-queue it after 3 s and
    # compute it a second time, concurrently.
    lease = 3
    texts = {f"slow-{i}": f"slow chunk text {i} " + "with many words " * 60 for i in range(300)}
    env = {
        "EMBEDPIPE_REDIS_URL": redis_url,
        "EMBEDPIPE_CACHE__NAMESPACE": f"slow-{uuid.uuid4().hex[:8]}",
        "EMBEDPIPE_JOBS__CHUNK_SIZE": str(len(texts)),
        "EMBEDPIPE_JOBS__VISIBILITY_TIMEOUT_SECONDS": str(lease),
    }
    with _cluster(tmp_path, env) as cluster:
        batch = submit(cluster.client, [request_line(key, text) for key, text in texts.items()])
        done = wait_for(cluster.client, batch.id, ("completed", "failed"), timeout=300)
        computations = _chunk_runs(cluster.workers, longer_than=lease)
        output = read_lines(cluster.client, done.output_file_id)
    assert done.status == "completed"
    assert len(computations) == 1, f"the chunk was computed {len(computations)} times"
    assert computations[0] > 2 * lease, f"{computations[0]:.1f}s: not slower than its lease"
    assert len(output) == len(texts)
