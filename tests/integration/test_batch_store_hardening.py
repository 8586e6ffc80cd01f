"""The low items of issue 19 on the job store's side, against the real stores (SQLite, Redis):

- listing one key's files reads that key's index, not every tenant's rows;
- per-owner usage (files, bytes, active batches) for the quotas;
- a full broker Redis (``noeviction`` at ``maxmemory``) is ``StorageFull`` (507), not a 500;
- ``jobs.sqlite3`` and its ``-wal``/``-shm`` files are 0600;
- files expire (``expires_after``, the retention setting) and are then never served;
- a download holds its file open, so a delete racing it cannot cut it short;
- job state on the cache Redis (no ``EMBEDPIPE_BROKER_URL``) is warned about at start.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from embedpipe.batches import objects as objects_module
from embedpipe.batches import service as service_module
from embedpipe.batches.objects import batch_object, file_object, new_batch_id, new_file_id, now
from embedpipe.batches.processor import BatchProcessor
from embedpipe.batches.runner import InProcessRunner
from embedpipe.batches.service import JobService
from embedpipe.batches.storage import Storage
from embedpipe.batches.store import JobStore
from embedpipe.batches.store_redis import RedisJobStore
from embedpipe.batches.store_sqlite import SqliteJobStore
from embedpipe.batches.wiring import open_store
from embedpipe.errors import InvalidInput, NotFound, StorageFull
from embedpipe.operations.openai_embeddings import EmbeddingRequest
from embedpipe.settings import JobsSettings, Settings
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


def _file(owner: str | None, created_at: int, size: int = 10) -> dict[str, Any]:
    return file_object(new_file_id(), "f.jsonl", "batch", size, owner) | {"created_at": created_at}


async def test_a_list_reads_only_the_callers_files(store: JobStore, tmp_path: Path) -> None:
    # The case: 3,000 files of key A made key B's `GET /v1/files?limit=1` walk them all.
    for index in range(3000):
        await store.put_file(_file("a", 1000 + index))
    mine = [_file("b", 500 + index) for index in range(3)]  # older than all of A's
    for file in mine:
        await store.put_file(file)
    newest = await store.list_files(None, None, 2, owner="b")
    assert [file["id"] for file in newest] == [mine[2]["id"], mine[1]["id"]]
    rest = await store.list_files("batch", newest[-1]["id"], 10, owner="b")
    assert [file["id"] for file in rest] == [mine[0]["id"]]
    assert {file["_owner"] for file in await store.list_files(None, None, 50, owner="a")} == {"a"}
    if isinstance(store, SqliteJobStore):
        plan = await store._run(
            lambda db: db.execute(
                "EXPLAIN QUERY PLAN SELECT doc FROM files WHERE owner = ? "
                "ORDER BY created_at DESC, id DESC LIMIT 2",
                ("b",),
            ).fetchall()
        )
        assert any("files_by_owner" in str(row) for row in plan), plan


async def test_usage_is_counted_per_owner(store: JobStore) -> None:
    await store.put_file(_file("a", 1, size=100))
    await store.put_file(_file("a", 2, size=50))
    gone = _file("a", 3, size=1000)
    await store.put_file(gone)
    await store.delete_file(gone["id"])
    await store.put_file(_file("b", 4, size=7))
    for status in ("validating", "in_progress", "completed"):
        batch = batch_object(new_batch_id(), "file-" + "0" * 24, "24h", None, owner="a")
        await store.put_batch(batch | {"status": status})
    usage = await store.usage("a")
    assert (usage.files, usage.bytes, usage.active_batches) == (2, 150, 2)
    other = await store.usage("b")
    assert (other.files, other.bytes, other.active_batches) == (1, 7, 0)


async def test_a_full_broker_redis_is_storage_full(
    private_redis: RedisServer, namespace: str
) -> None:
    admin = Redis.from_url(private_redis.url)
    store = RedisJobStore.from_url(private_redis.url, namespace)
    try:
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", str(used + 256 * 1024))
        with pytest.raises(StorageFull):
            for index in range(100):  # 10 MB of metadata-sized documents: it fills up
                await store.put_file(_file("a", index) | {"filename": "x" * 100_000})
        with pytest.raises(StorageFull):
            await store.put_batch(
                batch_object(new_batch_id(), "file-" + "0" * 24, "24h", {"k": "v" * 500_000})
            )
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
        await store.close()


async def test_the_job_database_is_private(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    try:
        await store.put_file(_file("a", 1))  # a write: the -wal and -shm files exist now
        for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
            mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
            assert mode == 0o600, f"{name}: {oct(mode)}"
    finally:
        await store.close()


async def _answer(request: EmbeddingRequest) -> dict[str, Any]:
    return {"object": "list", "data": [], "model": request.model, "usage": {}}


@pytest.fixture
async def jobs(store: JobStore, tmp_path: Path) -> AsyncIterator[JobService]:
    settings = JobsSettings(file_retention_seconds=60)
    storage = Storage(tmp_path / "data")
    processor = BatchProcessor(store, storage, settings, _answer)
    service = JobService(store, storage, settings, processor, InProcessRunner(processor, 1))
    yield service
    await service._runner.close()


async def test_files_expire_and_are_then_never_served(
    jobs: JobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = await jobs.upload("a.jsonl", "batch", io.BytesIO(b"{}\n"), "a")
    chosen = await jobs.upload("b.jsonl", "batch", io.BytesIO(b"{}\n"), "a", 7200)
    assert kept["expires_at"] == kept["created_at"] + 60  # the retention setting
    assert chosen["expires_at"] == chosen["created_at"] + 7200  # expires_after
    with pytest.raises(InvalidInput):
        await jobs.upload("c.jsonl", "batch", io.BytesIO(b"{}\n"), "a", 10)  # under an hour
    later = now() + 61
    monkeypatch.setattr(objects_module, "now", lambda: later)
    monkeypatch.setattr(service_module, "now", lambda: later)
    listed = [file["id"] for file in await jobs.files(None, None, 10, "a")]
    assert listed == [chosen["id"]]
    with pytest.raises(NotFound):
        await jobs.file(kept["id"], "a")
    assert not (tmp_path / "data" / "files" / kept["id"]).exists()
    assert (tmp_path / "data" / "files" / chosen["id"]).exists()


async def test_a_download_outlives_a_delete_that_races_it(jobs: JobService) -> None:
    content = b"".join(b"line %d\n" % index for index in range(200_000))
    uploaded = await jobs.upload("big.jsonl", "batch", io.BytesIO(content), "a")
    source = await jobs.open_file(uploaded["id"], "a")
    try:
        first = source.read(1024)
        await jobs.delete_file(uploaded["id"], "a")  # lands while the download runs
        assert first + source.read() == content
    finally:
        source.close()
    with pytest.raises(NotFound):
        await jobs.open_file(uploaded["id"], "a")


def test_job_state_on_the_cache_redis_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = "redis://127.0.0.1:1/0"  # never connected to: the warning comes at open
    with caplog.at_level(logging.WARNING, logger="embedpipe.batches"):
        open_store(Settings(data_dir=tmp_path, redis_url=url, broker_url=""))
        assert "EMBEDPIPE_BROKER_URL" in caplog.text
        caplog.clear()
        open_store(Settings(data_dir=tmp_path, redis_url=url, broker_url=url))
        assert "EMBEDPIPE_BROKER_URL" not in caplog.text


async def test_a_job_database_of_the_previous_version_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE files (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, "
        "purpose TEXT NOT NULL, doc TEXT NOT NULL);"
        "CREATE TABLE batches (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, "
        "status TEXT NOT NULL, doc TEXT NOT NULL, finalize_claimed INTEGER NOT NULL DEFAULT 0);"
    )
    file = _file("a", 5, size=42)
    batch = batch_object(new_batch_id(), file["id"], "24h", None, owner="a")
    old.execute("INSERT INTO files VALUES (?, ?, ?, ?)", (file["id"], 5, "batch", json.dumps(file)))
    old.execute(
        "INSERT INTO batches (id, created_at, status, doc) VALUES (?, ?, ?, ?)",
        (batch["id"], batch["created_at"], "in_progress", json.dumps(batch)),
    )
    old.commit()
    old.close()
    path.chmod(0o644)
    store = SqliteJobStore(path)
    try:
        assert [f["id"] for f in await store.list_files(None, None, 10, owner="a")] == [file["id"]]
        usage = await store.usage("a")
        assert (usage.files, usage.bytes, usage.active_batches) == (1, 42, 1)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        await store.close()
