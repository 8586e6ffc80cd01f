"""Batch files past a limit (issue 19, item 2): validation streams in bounded memory and stops
at the first line past a limit; a failed batch leaves nothing on disk; a chunk whose runs keep
dying fails its batch instead of being delivered forever; a finished batch keeps no chunk
file (they hold the input texts).

Run through the real :class:`BatchProcessor` on the real SQLite store, answering through the
real ``create_embeddings`` over the fake model. The same attack against real server and
worker processes, with their memory measured, is in ``tests/integration/test_batch_memory.py``.
"""

from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from embedpipe.batches.objects import batch_object, new_batch_id, new_file_id
from embedpipe.batches.processor import BatchProcessor
from embedpipe.batches.storage import Storage
from embedpipe.batches.store import PREPARE_RUN
from embedpipe.batches.store_sqlite import SqliteJobStore
from embedpipe.settings import JobsSettings
from tests.reliability.conftest import Embed

pytestmark = pytest.mark.reliability


def line(custom_id: str, text: Any = "hello") -> bytes:
    body = {"model": "fake", "input": text}
    request = {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}
    return json.dumps(request).encode() + b"\n"


@dataclass
class Jobs:
    store: SqliteJobStore
    storage: Storage
    processor: BatchProcessor

    async def submit(self, content: bytes) -> str:
        file_id = new_file_id()
        self.storage.save_upload(file_id, io.BytesIO(content), len(content) + 1)
        batch_id = new_batch_id()
        await self.store.put_batch(batch_object(batch_id, file_id, "24h", None))
        return batch_id

    async def run(self, batch_id: str) -> dict[str, Any]:
        for index in range(await self.processor.prepare(batch_id)):
            await self.processor.run_chunk(batch_id, index)
        batch = await self.store.get_batch(batch_id)
        assert batch is not None
        return batch

    def leftovers(self, batch_id: str) -> list[Path]:
        """What the batch left in its working directory."""
        directory = self.storage.batch_dir(batch_id)
        return sorted(directory.rglob("*")) if directory.exists() else []


def jobs_with(tmp_path: Path, embed: Embed, settings: JobsSettings) -> Jobs:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    storage = Storage(tmp_path / "data")
    return Jobs(store, storage, BatchProcessor(store, storage, settings, embed))


@pytest.fixture
async def make_jobs(tmp_path: Path, embed: Embed) -> AsyncIterator[Callable[[JobsSettings], Jobs]]:
    opened: list[Jobs] = []

    def make(settings: JobsSettings) -> Jobs:
        jobs = jobs_with(tmp_path / f"jobs{len(opened)}", embed, settings)
        opened.append(jobs)
        return jobs

    yield make
    for jobs in opened:
        await jobs.store.close()


def codes(batch: dict[str, Any]) -> list[str]:
    return [problem["code"] for problem in batch["errors"]["data"]]


async def test_a_flood_of_bad_lines_stops_at_the_limit_in_bounded_memory(
    make_jobs: Callable[[JobsSettings], Jobs],
) -> None:
    # The attack: one valid line and then a million lines of "x" (a 2 MB upload).
    jobs = make_jobs(JobsSettings(max_invalid_lines=100))
    batch_id = await jobs.submit(line("ok") + b"x\n" * 1_000_000)
    tracemalloc.start()
    try:
        batch = await jobs.run(batch_id)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batch["status"] == "failed"
    assert codes(batch)[0] == "too_many_invalid_lines"
    assert batch["errors"]["data"][0]["line"] == 102  # stopped at the 101st bad line
    assert codes(batch)[1:] == ["invalid_json"] * 20  # the first problems, with their lines
    assert [problem["line"] for problem in batch["errors"]["data"][1:4]] == [2, 3, 4]
    assert jobs.leftovers(batch_id) == []
    # Before, each bad line kept an error entry in memory: ~470 MB for this file.
    assert peak < 20 * 1024 * 1024, peak


async def test_a_line_past_the_byte_limit_fails_the_batch_without_reading_it_whole(
    make_jobs: Callable[[JobsSettings], Jobs],
) -> None:
    jobs = make_jobs(JobsSettings(max_line_bytes=4096, chunk_size=1))
    content = line("a") + line("b") + line("long", "y" * 10_000) + line("c")
    batch = await jobs.run(await jobs.submit(content))
    assert batch["status"] == "failed"
    assert codes(batch) == ["line_too_long"]
    assert batch["errors"]["data"][0]["line"] == 3
    assert "4096 bytes" in batch["errors"]["data"][0]["message"]
    assert jobs.leftovers(batch["id"]) == []  # the two chunks written before it are gone


async def test_one_request_too_many_stops_validation_and_leaves_no_chunk_files(
    make_jobs: Callable[[JobsSettings], Jobs],
) -> None:
    jobs = make_jobs(JobsSettings(max_requests_per_batch=10, chunk_size=2))
    content = b"".join(line(f"r{index}") for index in range(15))
    batch = await jobs.run(await jobs.submit(content))
    assert batch["status"] == "failed"
    assert codes(batch) == ["too_many_requests"]
    assert batch["errors"]["data"][0]["line"] == 11
    assert jobs.leftovers(batch["id"]) == []


async def test_up_to_the_limits_the_batch_runs_and_keeps_no_chunk_files(
    make_jobs: Callable[[JobsSettings], Jobs],
) -> None:
    jobs = make_jobs(JobsSettings(max_requests_per_batch=10, max_invalid_lines=2, chunk_size=3))
    content = b"".join(line(f"r{index}") for index in range(8)) + b"x\n" * 2
    batch = await jobs.run(await jobs.submit(content))
    assert batch["status"] == "completed", batch["errors"]
    assert batch["request_counts"] == {"total": 10, "completed": 8, "failed": 2}
    # The chunk files (the input texts) are gone once the output is assembled.
    assert jobs.leftovers(batch["id"]) == []


async def test_a_chunk_closes_at_its_input_limit(make_jobs: Callable[[JobsSettings], Jobs]) -> None:
    # Five requests of 1,000 inputs: chunks of 2 + 2 + 1 requests, never 5,000 vectors at once.
    jobs = make_jobs(JobsSettings(chunk_max_inputs=2048))
    texts = [f"text {index}" for index in range(1000)]
    content = b"".join(line(f"r{index}", texts) for index in range(5))
    batch_id = await jobs.submit(content)
    assert await jobs.processor.prepare(batch_id) == 3


async def test_a_chunk_whose_runs_keep_dying_fails_the_batch(
    make_jobs: Callable[[JobsSettings], Jobs],
) -> None:
    jobs = make_jobs(JobsSettings(chunk_size=2, max_crashes=3))
    batch_id = await jobs.submit(b"".join(line(f"r{index}") for index in range(4)))
    assert await jobs.processor.prepare(batch_id) == 2
    await jobs.processor.run_chunk(batch_id, 0)
    # Three runs of chunk 1 started and never ended: each one's process was killed (as
    # an out-of-memory kill does; acks-late brings the task back every time).
    for _ in range(3):
        await jobs.store.begin_run(batch_id, 1)
    await jobs.processor.run_chunk(batch_id, 1)
    batch = await jobs.store.get_batch(batch_id)
    assert batch is not None and batch["status"] == "failed"
    assert codes(batch) == ["crashed"]
    assert "Chunk 1" in batch["errors"]["data"][0]["message"]
    assert jobs.leftovers(batch_id) == []
    # A later delivery of the same task finds the batch over and does nothing.
    await jobs.processor.run_chunk(batch_id, 1)
    assert jobs.leftovers(batch_id) == []


async def test_runs_that_ended_do_not_count_as_crashes(
    make_jobs: Callable[[JobsSettings], Jobs],
) -> None:
    jobs = make_jobs(JobsSettings(max_crashes=1))
    batch_id = await jobs.submit(line("a"))
    for _ in range(3):  # three validations that ended (a retried task)
        assert await jobs.store.begin_run(batch_id, PREPARE_RUN) == 0
        await jobs.store.end_run(batch_id, PREPARE_RUN)
    batch = await jobs.run(batch_id)
    assert batch["status"] == "completed"


async def test_a_validation_that_keeps_dying_fails_the_batch(
    make_jobs: Callable[[JobsSettings], Jobs],
) -> None:
    jobs = make_jobs(JobsSettings(max_crashes=2))
    batch_id = await jobs.submit(line("a"))
    for _ in range(2):
        await jobs.store.begin_run(batch_id, PREPARE_RUN)
    batch = await jobs.run(batch_id)
    assert batch["status"] == "failed"
    assert codes(batch) == ["crashed"]
