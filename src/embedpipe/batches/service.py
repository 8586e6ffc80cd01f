"""JobService: what the Files and Batch routes ask of the job machinery (no HTTP here).

With API keys on, every file and batch belongs to the key that made it (a batch's output and
error files to the batch's key): another key gets 404 for it and never sees it in a list.
``owner`` is the caller's key name, None when auth is off (then everything is visible).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from embedpipe import metrics
from embedpipe.batches.objects import (
    COMPLETION_WINDOW_SECONDS,
    JsonDict,
    batch_object,
    file_object,
    is_batch_id,
    is_file_id,
    new_batch_id,
    new_file_id,
)
from embedpipe.batches.processor import BatchProcessor
from embedpipe.batches.runner import Runner
from embedpipe.batches.storage import Storage
from embedpipe.batches.store import JobStore
from embedpipe.errors import InvalidInput, NotFound
from embedpipe.settings import JobsSettings


class JobService:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        settings: JobsSettings,
        processor: BatchProcessor,
        runner: Runner,
    ) -> None:
        self._store = store
        self._storage = storage
        self._settings = settings
        self._processor = processor
        self._runner = runner

    async def close(self) -> None:
        await self._runner.close()
        await self._store.close()

    async def resume_active(self) -> None:
        """Pick up the batches that were active when the last process stopped."""
        await self._runner.resume(await self._store.active_batch_ids())

    # -- files -----------------------------------------------------------------------------

    async def upload(
        self, filename: str, purpose: str, source: BinaryIO, owner: str | None = None
    ) -> JsonDict:
        if purpose != "batch":
            raise InvalidInput(f"'purpose' must be \"batch\" (got {purpose!r}).", param="purpose")
        file_id = new_file_id()
        size = await asyncio.to_thread(
            self._storage.save_upload, file_id, source, self._settings.max_file_bytes
        )
        file = file_object(file_id, filename[:255] or "upload.jsonl", purpose, size, owner)
        await self._store.put_file(file)
        return public(file)

    async def file(self, file_id: str, owner: str | None = None) -> JsonDict:
        file = await self._store.get_file(file_id) if is_file_id(file_id) else None
        if file is None or not visible(file, owner):
            raise NotFound(f"No such file: '{file_id}'.", param="file_id")
        return public(file)

    async def file_path(self, file_id: str, owner: str | None = None) -> Path:
        await self.file(file_id, owner)
        return self._storage.file_path(file_id)

    async def delete_file(self, file_id: str, owner: str | None = None) -> JsonDict:
        await self.file(file_id, owner)
        await self._store.delete_file(file_id)
        self._storage.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def files(
        self, purpose: str | None, after: str | None, limit: int, owner: str | None = None
    ) -> list[JsonDict]:
        async def page(start: str | None, size: int) -> list[JsonDict]:
            return await self._store.list_files(purpose, start, size)

        return await _visible_page(page, after, limit, owner)

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        owner: str | None = None,
    ) -> JsonDict:
        if endpoint != "/v1/embeddings":
            raise InvalidInput(
                f"'endpoint' must be \"/v1/embeddings\" (got {endpoint!r}).", param="endpoint"
            )
        if completion_window not in COMPLETION_WINDOW_SECONDS:
            raise InvalidInput(
                f"'completion_window' must be one of {sorted(COMPLETION_WINDOW_SECONDS)}.",
                param="completion_window",
            )
        file = await self.file(input_file_id, owner)
        if file["purpose"] != "batch":
            raise InvalidInput(
                f"File '{input_file_id}' has purpose {file['purpose']!r}, not \"batch\".",
                param="input_file_id",
            )
        batch = batch_object(
            new_batch_id(),
            input_file_id,
            completion_window,
            metadata,
            self._settings.expire_after_seconds,
            owner,
        )
        await self._store.put_batch(batch)
        await self._runner.submit(batch["id"])
        metrics.JOBS_SUBMITTED.inc()
        return public(batch)

    async def batch(self, batch_id: str, owner: str | None = None) -> JsonDict:
        batch = await self._store.get_batch(batch_id) if is_batch_id(batch_id) else None
        if batch is None or not visible(batch, owner):
            raise NotFound(f"No such batch: '{batch_id}'.", param="batch_id")
        if batch["status"] in ("in_progress", "cancelling", "finalizing"):
            # Live progress: the final counts are written when the batch finalizes.
            counts = await self._store.chunk_counts(batch_id)
            batch["request_counts"] = {
                "total": batch["request_counts"]["total"],
                "completed": counts.completed,
                "failed": counts.failed + int(batch.get("_prepare_failed", 0)),
            }
        return public(batch)

    async def batches(
        self, after: str | None, limit: int, owner: str | None = None
    ) -> list[JsonDict]:
        return await _visible_page(self._store.list_batches, after, limit, owner)

    async def cancel(self, batch_id: str, owner: str | None = None) -> JsonDict:
        batch = await self.batch(batch_id, owner)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if not await self._processor.cancel(batch_id):
            raise InvalidInput(
                f"Batch '{batch_id}' is {batch['status']} and cannot be cancelled.",
                param="batch_id",
            )
        return await self.batch(batch_id, owner)


def visible(item: JsonDict, owner: str | None) -> bool:
    """Whether the caller ``owner`` may see ``item`` (objects made with auth off are shared)."""
    item_owner = item.get("_owner")
    return owner is None or item_owner is None or item_owner == owner


async def _visible_page(
    page: Callable[[str | None, int], Awaitable[list[JsonDict]]],
    after: str | None,
    limit: int,
    owner: str | None,
) -> list[JsonDict]:
    """Up to ``limit`` items the caller may see, newest first, after ``after``: the store's
    pages are read on until enough of them are the caller's."""
    shown: list[JsonDict] = []
    while len(shown) < limit:
        items = await page(after, limit)
        shown += [public(item) for item in items if visible(item, owner)]
        if len(items) < limit:
            break
        after = items[-1]["id"]
    return shown[:limit]


def public(batch: JsonDict) -> JsonDict:
    """The OpenAI object, without our bookkeeping fields (they start with an underscore)."""
    return {key: value for key, value in batch.items() if not key.startswith("_")}
