"""Issue 19, item 2, against real processes: an 8 MB batch file of one valid line and four
million lines of ``x`` leaves the process that validates it (the API on the embedded default,
a Celery worker in distributed mode) within 50 MB of where it was, fails the batch with a
clear error, and leaves no file of the batch on disk.

Before, each bad line kept an error entry in memory: the API grew by 470 MB per 2 MB upload
and a worker from 586 MB to 2.6 GB, killed and redelivered in a loop.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import require_redis_server
from tests.integration.batch_helpers import request_line, wait_for
from tests.memory import peak_bytes, reset_peak, rss_bytes
from tests.processes import start_together, stop_all
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess
from tests.worker_process import WorkerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

ATTACK = (request_line("valid", "one valid line") + "\n").encode() + b"x\n" * 4_000_000
ALLOWED_GROWTH = 50 * 1024 * 1024


def _attack_and_measure(client: OpenAI, pid: int) -> tuple[str, int, list[str]]:
    """Upload the file and run it as a batch; its status, the process's growth (peak over
    the resident size before), and the batch's error codes."""
    before = rss_bytes(pid)
    reset_peak(pid)
    upload = client.files.create(file=("flood.jsonl", io.BytesIO(ATTACK)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait_for(client, batch.id, ("completed", "failed", "expired", "cancelled"), 120)
    growth = peak_bytes(pid) - before
    print(f"peak RSS growth of pid {pid}: {growth / 2**20:.1f} MiB")
    errors = [error.code or "" for error in (done.errors.data if done.errors else None) or []]
    client.files.delete(upload.id)
    return done.status, growth, errors


def _batch_files(data_dir: Path) -> list[Path]:
    batches = data_dir / "batches"
    return sorted(batches.rglob("*")) if batches.exists() else []


def test_the_api_validates_a_flood_of_bad_lines_in_flat_memory(
    embedded_server: ServerProcess,
) -> None:
    assert embedded_server.process is not None
    data_dir = Path(embedded_server._env["EMBEDPIPE_DATA_DIR"])
    with OpenAI(base_url=f"{embedded_server.url}/v1", api_key="unused", max_retries=0) as client:
        status, growth, errors = _attack_and_measure(client, embedded_server.process.pid)
    assert growth < ALLOWED_GROWTH, f"the API grew by {growth / 2**20:.0f} MiB"
    assert status == "failed"
    assert errors[0] == "too_many_invalid_lines", errors
    assert _batch_files(data_dir) == []


@pytest.fixture(scope="module")
def celery_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OpenAI, WorkerProcess, Path]]:
    require_redis_server()
    root = tmp_path_factory.mktemp("batch-memory")
    with RedisServer.start_new(root / "redis") as redis:
        env = {"EMBEDPIPE_REDIS_URL": redis.url, "EMBEDPIPE_DATA_DIR": str(root / "data")}
        api = ServerProcess(env, root / "api.log")
        worker = WorkerProcess(env, root / "worker.log", "memory@test")
        processes: list[ServerProcess | WorkerProcess] = [api, worker]
        start_together(processes)
        client = OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
        try:
            yield client, worker, root / "data"
        finally:
            client.close()
            stop_all(processes)


@pytest.mark.redis
def test_a_celery_worker_validates_a_flood_of_bad_lines_in_flat_memory(
    celery_stack: tuple[OpenAI, WorkerProcess, Path],
) -> None:
    client, worker, data_dir = celery_stack
    # The worker opens its runtime on its first task: warm it with a one-line batch first.
    warm = client.files.create(
        file=("warm.jsonl", io.BytesIO(request_line("w", "warm up").encode())), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=warm.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    assert wait_for(client, batch.id, ("completed", "failed"), 120).status == "completed"
    assert worker.process is not None
    status, growth, errors = _attack_and_measure(client, worker.process.pid)
    assert growth < ALLOWED_GROWTH, f"the worker grew by {growth / 2**20:.0f} MiB"
    assert status == "failed"
    assert errors[0] == "too_many_invalid_lines", errors
    assert _batch_files(data_dir) == []
    assert worker.process.poll() is None  # alive: nothing to redeliver
