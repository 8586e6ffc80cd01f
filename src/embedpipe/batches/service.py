"""JobService: what the Files and Batch routes ask of the job machinery (no HTTP here).

With API keys on, every file and batch belongs to the key that made it (a batch's output and
error files to the batch's key): another key gets 404 for it and never sees it in a list.
``owner`` is the caller's key name, None when auth is off (then everything is visible).
Lists show the caller's own objects, read from the store's index by owner.

Each key has quotas (``jobs.max_files_per_key``, ``max_stored_bytes_per_key``,
``max_active_batches_per_key``): past one, 429 ``insufficient_quota``. Batch ``metadata`` has
OpenAI's limits (16 pairs, keys up to 64 characters, values up to 512), so no caller can fill
the job store through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import anyio

from embedpipe import metrics
from embedpipe.batches.objects import (
    BATCH_ENDPOINTS,
    COMPLETION_WINDOW_SECONDS,
    EXPIRES_AFTER_SECONDS,
    JsonDict,
    batch_object,
    expired,
    file_object,
    is_batch_id,
    is_file_id,
    new_batch_id,
    new_file_id,
    now,
)
from embedpipe.batches.processor import BatchProcessor
from embedpipe.batches.runner import Runner
from embedpipe.batches.storage import Storage, UploadSpool
from embedpipe.batches.store import JobStore
from embedpipe.errors import InvalidInput, NotFound, QuotaExceeded, TooLarge
from embedpipe.settings import JobsSettings


class IncomingUpload:
    """An upload being streamed into the data dir (see :meth:`JobService.start_upload`)."""

    def __init__(self, spool: UploadSpool, quota_bound: bool, settings: JobsSettings) -> None:
        self.spool = spool
        self._quota_bound = quota_bound  # its room is the key's storage quota, not the file
        self._settings = settings

    def count(self, size: int) -> None:
        """Account for ``size`` more bytes before they are written: TooLarge past the
        file limit, QuotaExceeded past the key's storage quota."""
        try:
            self.spool.count(size)
        except TooLarge:
            if self._quota_bound:
                raise QuotaExceeded(
                    "This file would take this API key's files past their quota of "
                    f"{self._settings.max_stored_bytes_per_key} bytes: delete some first.",
                    param="file",
                    code="storage_quota_exceeded",
                ) from None
            raise

    async def write(self, block: bytes) -> None:
        """Append counted bytes, in a worker thread (awaited to its end even if cancelled,
        so the file is never closed under a write)."""
        await anyio.to_thread.run_sync(self.spool.write, block)

    def discard(self) -> None:
        """Remove the partial file unless it was committed (safe to call twice)."""
        self.spool.discard()


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
        self,
        filename: str,
        purpose: str,
        source: BinaryIO,
        owner: str | None = None,
        expires_after_seconds: int | None = None,
    ) -> JsonDict:
        """``expires_after_seconds``: OpenAI's ``expires_after`` (anchored at the upload);
        None: the retention setting. The HTTP route streams instead: see
        :meth:`start_upload`."""
        self.check_upload_fields(purpose, expires_after_seconds)
        upload = await self.start_upload(owner)
        try:
            while block := await anyio.to_thread.run_sync(source.read, 1 << 20):
                upload.count(len(block))
                await upload.write(block)
            return await self.finish_upload(upload, filename, purpose, owner, expires_after_seconds)
        finally:
            upload.discard()

    def check_upload_fields(self, purpose: str, expires_after_seconds: int | None) -> int:
        """InvalidInput unless ``purpose`` is "batch" and ``expires_after`` is in range;
        the file's lifetime in seconds (0: kept until deleted)."""
        if purpose != "batch":
            raise InvalidInput(f"'purpose' must be \"batch\" (got {purpose!r}).", param="purpose")
        if expires_after_seconds is not None:
            return check_expires_after(expires_after_seconds, "expires_after")
        return self._settings.file_retention_seconds

    async def start_upload(self, owner: str | None) -> IncomingUpload:
        """Check the key's quotas and open a spool in the data dir for an upload's bytes.
        The caller streams into it and ends with :meth:`finish_upload`, and in every case
        then calls its ``discard`` (nothing is left behind unless it was committed)."""
        await self.sweep_expired()
        usage = await self._store.usage(owner)
        self._check_file_quota(usage.files + 1, usage.bytes)
        room = self._settings.max_file_bytes
        if self._settings.max_stored_bytes_per_key:
            room = min(room, max(0, self._settings.max_stored_bytes_per_key - usage.bytes))
        spool = await anyio.to_thread.run_sync(self._storage.start_upload, room)
        return IncomingUpload(spool, room < self._settings.max_file_bytes, self._settings)

    async def finish_upload(
        self,
        upload: IncomingUpload,
        filename: str,
        purpose: str,
        owner: str | None = None,
        expires_after_seconds: int | None = None,
    ) -> JsonDict:
        """Check the form's fields, then store the streamed upload as a file."""
        lifetime = self.check_upload_fields(purpose, expires_after_seconds)
        file_id = new_file_id()
        size = await anyio.to_thread.run_sync(upload.spool.commit, file_id)
        file = file_object(
            file_id, filename[:255] or "upload.jsonl", purpose, size, owner, lifetime
        )
        try:
            await self._store.put_file(file)
        except BaseException:
            self._storage.delete_file(file_id)
            raise
        return public(file)

    def _check_file_quota(self, files: int, stored: int) -> None:
        quota = self._settings
        if quota.max_files_per_key and files > quota.max_files_per_key:
            raise QuotaExceeded(
                f"This API key holds {quota.max_files_per_key} files, its quota: delete some "
                "before uploading more.",
                param="file",
                code="file_quota_exceeded",
            )
        if quota.max_stored_bytes_per_key and stored >= quota.max_stored_bytes_per_key:
            raise QuotaExceeded(
                f"This API key's files take {stored} bytes, its quota is "
                f"{quota.max_stored_bytes_per_key}: delete some before uploading more.",
                param="file",
                code="storage_quota_exceeded",
            )

    async def file(self, file_id: str, owner: str | None = None) -> JsonDict:
        file = await self._store.get_file(file_id) if is_file_id(file_id) else None
        if file is not None and expired(file):
            await self._remove_file(file_id)
            file = None
        if file is None or not visible(file, owner):
            raise NotFound(f"No such file: '{file_id}'.", param="file_id")
        return public(file)

    async def sweep_expired(self, limit: int = 100) -> int:
        """Delete up to ``limit`` files past their ``expires_at`` (run at each upload and
        listing, so the store never grows with files nobody may read)."""
        ids = await self._store.expired_files(now(), limit)
        for file_id in ids:
            await self._remove_file(file_id)
        return len(ids)

    async def _remove_file(self, file_id: str) -> None:
        await self._store.delete_file(file_id)
        await asyncio.to_thread(self._storage.delete_file, file_id)

    async def file_path(self, file_id: str, owner: str | None = None) -> Path:
        await self.file(file_id, owner)
        return self._storage.file_path(file_id)

    async def open_file(self, file_id: str, owner: str | None = None) -> BinaryIO:
        """The file's bytes, opened: a delete that races the download unlinks the name, and
        the open file reads on to its end (NotFound when it is gone already)."""
        path = await self.file_path(file_id, owner)
        try:
            return await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise NotFound(f"No such file: '{file_id}'.", param="file_id") from None

    async def delete_file(self, file_id: str, owner: str | None = None) -> JsonDict:
        await self.file(file_id, owner)
        await self._remove_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def files(
        self, purpose: str | None, after: str | None, limit: int, owner: str | None = None
    ) -> list[JsonDict]:
        await self.sweep_expired()

        async def page(start: str | None, size: int) -> list[JsonDict]:
            files = await self._store.list_files(purpose, start, size, owner)
            # Past the sweep's share: expired files are not shown, though still stored.
            return [file | {"_expired": True} if expired(file) else file for file in files]

        return await _visible_page(page, after, limit, owner)

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        owner: str | None = None,
        output_expires_after_seconds: int | None = None,
    ) -> JsonDict:
        if endpoint not in BATCH_ENDPOINTS:
            raise InvalidInput(
                f"'endpoint' must be one of {', '.join(BATCH_ENDPOINTS)} (got {endpoint!r}).",
                param="endpoint",
            )
        if completion_window not in COMPLETION_WINDOW_SECONDS:
            raise InvalidInput(
                f"'completion_window' must be one of {sorted(COMPLETION_WINDOW_SECONDS)}.",
                param="completion_window",
            )
        check_metadata(metadata)
        file = await self.file(input_file_id, owner)
        if file["purpose"] != "batch":
            raise InvalidInput(
                f"File '{input_file_id}' has purpose {file['purpose']!r}, not \"batch\".",
                param="input_file_id",
            )
        active = (await self._store.usage(owner)).active_batches
        if self._settings.max_active_batches_per_key and (
            active >= self._settings.max_active_batches_per_key
        ):
            raise QuotaExceeded(
                f"This API key has {active} batches running, its quota: wait for one to end "
                "or cancel one.",
                param="input_file_id",
                code="batch_quota_exceeded",
            )
        batch = batch_object(
            new_batch_id(),
            input_file_id,
            completion_window,
            metadata,
            self._settings.expire_after_seconds,
            owner,
            endpoint,
        )
        if output_expires_after_seconds is not None:
            batch["_output_lifetime"] = check_expires_after(
                output_expires_after_seconds, "output_expires_after"
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
        async def page(start: str | None, size: int) -> list[JsonDict]:
            return await self._store.list_batches(start, size, owner)

        return await _visible_page(page, after, limit, owner)

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


METADATA_PAIRS = 16
METADATA_KEY_CHARS = 64
METADATA_VALUE_CHARS = 512


def check_expires_after(seconds: int, param: str) -> int:
    low, high = EXPIRES_AFTER_SECONDS
    if not low <= seconds <= high:
        raise InvalidInput(
            f"'{param}.seconds' must be between {low} and {high} (got {seconds}).", param=param
        )
    return seconds


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's limits on a batch's ``metadata``; InvalidInput past one."""
    if metadata is None:
        return
    if len(metadata) > METADATA_PAIRS:
        raise InvalidInput(
            f"'metadata' holds {len(metadata)} pairs; at most {METADATA_PAIRS} are allowed.",
            param="metadata",
        )
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS:
            raise InvalidInput(
                f"A 'metadata' key is {len(key)} characters long; at most "
                f"{METADATA_KEY_CHARS} are allowed.",
                param="metadata",
            )
        if len(value) > METADATA_VALUE_CHARS:
            raise InvalidInput(
                f"'metadata' value of {key[:64]!r} is {len(value)} characters long; at most "
                f"{METADATA_VALUE_CHARS} are allowed.",
                param="metadata",
            )


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
        shown += [
            public(item) for item in items if visible(item, owner) and not item.get("_expired")
        ]
        if len(items) < limit:
            break
        after = items[-1]["id"]
    return shown[:limit]


def public(batch: JsonDict) -> JsonDict:
    """The OpenAI object, without our bookkeeping fields (they start with an underscore)."""
    return {key: value for key, value in batch.items() if not key.startswith("_")}
