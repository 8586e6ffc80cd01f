"""A batch that outlives its completion window ends ``expired``: finished chunks stay in the
output file, the rest become ``batch_expired`` entries of the error file, each request once.

The processor runs against the real job stores (SQLite, Redis); the clock is moved forward
instead of waiting a day. The embedding itself is covered by the end-to-end batch tests.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from embedpipe.batches import processor as processor_module
from embedpipe.batches.objects import batch_object, new_batch_id, new_file_id, now
from embedpipe.batches.processor import BatchProcessor
from embedpipe.batches.storage import Storage
from embedpipe.batches.store import JobStore
from embedpipe.operations.openai_embeddings import EmbeddingRequest
from embedpipe.settings import JobsSettings

pytestmark = pytest.mark.redis


async def _answer(request: EmbeddingRequest) -> dict[str, Any]:
    return {"object": "list", "data": [], "model": request.model, "usage": {}}


def _lines(count: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "m", "input": f"text {i}"},
            }
        ).encode()
        + b"\n"
        for i in range(count)
    )


async def _new_batch(store: JobStore, storage: Storage, lines: int) -> str:
    file_id = new_file_id()
    storage.save_upload(file_id, io.BytesIO(_lines(lines)), 1 << 20)
    batch = batch_object(new_batch_id(), file_id, "24h", None, expire_after_seconds=60)
    await store.put_batch(batch)
    return str(batch["id"])


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line]


async def test_chunks_after_the_window_expire_and_the_rest_is_kept(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path / "data")
    processor = BatchProcessor(store, storage, JobsSettings(chunk_size=2), _answer)
    batch_id = await _new_batch(store, storage, lines=6)
    assert await processor.prepare(batch_id) == 3
    await processor.run_chunk(batch_id, 0)

    later = now() + 120  # past the 60 s window
    monkeypatch.setattr(processor_module, "now", lambda: later)
    await processor.run_chunk(batch_id, 1)
    await processor.run_chunk(batch_id, 2)
    await processor.run_chunk(batch_id, 2)  # a duplicated task changes nothing

    batch = await store.get_batch(batch_id)
    assert batch is not None
    assert batch["status"] == "expired"
    assert batch["expired_at"] == later
    assert batch["request_counts"] == {"total": 6, "completed": 2, "failed": 4}
    output = _jsonl(storage.file_path(batch["output_file_id"]))
    errors = _jsonl(storage.file_path(batch["error_file_id"]))
    assert [entry["custom_id"] for entry in output] == ["req-0", "req-1"]
    assert sorted(entry["custom_id"] for entry in errors) == ["req-2", "req-3", "req-4", "req-5"]
    assert {entry["error"]["code"] for entry in errors} == {"batch_expired"}
    assert all(entry["response"] is None for entry in errors)


async def test_a_batch_never_started_in_its_window_expires(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path / "data")
    processor = BatchProcessor(store, storage, JobsSettings(chunk_size=2), _answer)
    batch_id = await _new_batch(store, storage, lines=3)
    monkeypatch.setattr(processor_module, "now", lambda: 2**40)
    assert await processor.prepare(batch_id) == 0
    batch = await store.get_batch(batch_id)
    assert batch is not None
    assert batch["status"] == "expired"
    assert batch["expired_at"] == 2**40
