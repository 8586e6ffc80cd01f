"""Batches on Celery workers (distributed mode): a worker killed with SIGKILL mid-job and
duplicated chunk tasks still give every custom_id exactly once, with the right vectors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class Cluster:
    env: dict[str, str]
    api: ServerProcess
    workers: list[WorkerProcess]
    client: OpenAI


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_redis_server()
    root = tmp_path_factory.mktemp("celery")
    with RedisServer.start_new(root / "redis") as redis:
        env = {
            "EMBEDPIPE_REDIS_URL": redis.url,
            "EMBEDPIPE_DATA_DIR": str(root / "data"),
            "EMBEDPIPE_JOBS__CHUNK_SIZE": "25",
            # Short, so a killed worker's chunk comes back within the test.
            "EMBEDPIPE_JOBS__VISIBILITY_TIMEOUT_SECONDS": "8",
        }
        api = ServerProcess(env, root / "api.log").start()
        workers = [
            WorkerProcess(env, root / f"worker{index}.log", f"w{index}@test").start()
            for index in range(2)
        ]
        client = OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
        try:
            yield Cluster(env, api, workers, client)
        finally:
            client.close()
            for worker in workers:
                worker.stop()
            api.stop()


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
    while _completed(cluster.client, batch.id) < 300:
        assert time.monotonic() < deadline, "no progress before the kill"
        time.sleep(0.2)
    victim = cluster.workers[0]
    victim.kill()
    done = wait_for(cluster.client, batch.id, ("completed", "failed"), timeout=300)
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
    celery = create_celery(Settings(redis_url=cluster.env["EMBEDPIPE_REDIS_URL"]))
    try:
        for index in range(150 // 25):  # every chunk once more, as a redelivery would
            celery.send_task(CHUNK_TASK, args=[batch.id, index], queue="embedpipe")
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
