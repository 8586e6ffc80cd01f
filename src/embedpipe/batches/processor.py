"""The life of a batch, independent of where it runs (in the server or on Celery workers).

    validating --prepare--> in_progress --chunks--> finalizing --> completed
         |                       |                        |
         +--> failed             |                        +--(a chunk expired)--> expired
                                 +--cancel--> cancelling --chunks skipped--> cancelled

``prepare`` checks every line and splits the valid requests into chunk files, in bounded
memory (``validation.py``). ``run_chunk`` computes one chunk and commits its output
atomically; a chunk run twice (a retried or duplicated task) produces the same files and
counts once. Whoever commits the last chunk
assembles the output and error files and removes the chunk files. A chunk whose runs keep
dying (each run's process killed) fails its batch after ``max_crashes`` runs, instead of
being delivered again forever; a batch that fails leaves no file of its own behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from embedpipe import metrics
from embedpipe.batches.objects import JsonDict, file_object, now
from embedpipe.batches.storage import Storage, concatenate_atomically, write_atomically
from embedpipe.batches.store import PREPARE_RUN, JobStore
from embedpipe.batches.validation import PREPARE_ERRORS, chunk_name, problem, request_id, split_file
from embedpipe.error_status import status_for
from embedpipe.errors import (
    EmbedpipeError,
    InvalidInput,
    NotReady,
    Overloaded,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from embedpipe.operations.openai_embeddings import EmbeddingRequest
from embedpipe.operations.rerank import RerankRequest
from embedpipe.settings import JobsSettings
from embedpipe.tenancy import serving_tenant

log = logging.getLogger("embedpipe.batches")

# One embeddings request body in, the response body out (raises EmbedpipeError).
EmbedRequest = Callable[[EmbeddingRequest], Awaitable[dict[str, Any]]]
# The same for a rerank line (``url: "/v1/rerank"``).
RerankLine = Callable[[RerankRequest], Awaitable[dict[str, Any]]]

T = TypeVar("T")

_OVERLOAD_RETRIES = 30
_RUNNING_STATUSES = ("in_progress", "cancelling", "finalizing")


class BatchProcessor:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        settings: JobsSettings,
        embed: EmbedRequest,
        rerank: RerankLine | None = None,
    ) -> None:
        self._store = store
        self._storage = storage
        self._settings = settings
        self._embed = embed
        self._rerank = rerank

    # -- prepare -------------------------------------------------------------------------

    async def prepare(self, batch_id: str) -> int:
        """Validate the input file and write the chunk files; the number of chunks (0 when the
        batch failed validation or is no longer active)."""
        batch = await self._store.get_batch(batch_id)
        if batch is None or batch["status"] not in ("validating", "in_progress", "cancelling"):
            return 0
        if "_chunk_count" in batch:  # prepared already (this is a retry)
            return int(batch["_chunk_count"])
        if _past_window(batch):  # never started within its window (no worker took it)
            if await self._store.transition(
                batch_id, "expired", ["validating"], {"expired_at": now()}
            ):
                metrics.JOBS.labels(status="expired").inc()
            return 0
        crashed = await self._store.begin_run(batch_id, PREPARE_RUN)
        try:
            if crashed >= self._settings.max_crashes:
                await self._fail(batch_id, [_crashed("Validating the input file", crashed)])
                return 0
            return await self._prepare(batch_id, batch["input_file_id"])
        finally:
            await self._store.end_run(batch_id, PREPARE_RUN)

    async def _prepare(self, batch_id: str, input_file_id: str) -> int:
        source = self._storage.file_path(input_file_id)
        directory = self._storage.batch_dir(batch_id)
        try:
            split = await asyncio.to_thread(split_file, source, directory, batch_id, self._settings)
        except OSError:
            log.exception("batch %s: cannot read its input file", batch_id)
            await self._fail(batch_id, [problem("file_unreadable", "The input file is gone.")])
            return 0
        if split.fatal is not None:
            await self._fail(batch_id, [split.fatal, *split.shown])
            return 0
        if not split.chunks:
            shown = split.shown or [problem("empty_file", "The input file holds no requests.")]
            await self._fail(batch_id, shown)
            return 0
        await self._store.update_batch(
            batch_id, {"_chunk_count": split.chunks, "_prepare_failed": split.invalid}
        )
        counts = {"total": split.total, "completed": 0, "failed": split.invalid}
        await self._store.transition(
            batch_id,
            "in_progress",
            ["validating"],
            {"in_progress_at": now(), "request_counts": counts},
        )
        return split.chunks

    async def _fail(
        self,
        batch_id: str,
        errors: list[JsonDict],
        allowed_from: tuple[str, ...] = ("validating",),
    ) -> None:
        """Fail the batch with ``errors`` and remove everything it wrote."""
        failed = await self._store.transition(
            batch_id,
            "failed",
            allowed_from,
            {"failed_at": now(), "errors": {"object": "list", "data": errors}},
        )
        await asyncio.to_thread(self._storage.remove_batch_dir, batch_id)
        if failed:
            metrics.JOBS.labels(status="failed").inc()

    # -- chunks ----------------------------------------------------------------------------

    async def run_chunk(self, batch_id: str, index: int) -> None:
        batch = await self._store.get_batch(batch_id)
        if batch is None:
            return
        if batch["status"] == "cancelling":
            await self._store.commit_chunk(batch_id, index, 0, 0)  # skipped
        elif batch["status"] == "in_progress" and _past_window(batch):
            await self._expire_chunk(batch_id, index)
        elif batch["status"] == "in_progress" and not await self._store.chunk_done(batch_id, index):
            crashed = await self._store.begin_run(batch_id, index)
            try:
                if crashed >= self._settings.max_crashes:
                    # A poisoned chunk: each run killed its process. Redelivering it again
                    # would only kill another worker.
                    await self._fail(
                        batch_id, [_crashed(f"Chunk {index}", crashed)], _RUNNING_STATUSES
                    )
                    return
                await self._run_chunk(batch, index)
            finally:
                await self._store.end_run(batch_id, index)
        await self.maybe_finalize(batch_id)

    async def _run_chunk(self, batch: JsonDict, index: int) -> None:
        batch_id = batch["id"]
        started = time.perf_counter()
        with serving_tenant(batch.get("_owner")):  # its cache namespace, if per tenant
            completed, failed = await self._compute_chunk(batch_id, index)
        if await self._store.commit_chunk(batch_id, index, completed, failed):
            metrics.JOB_ITEMS.labels(status="succeeded").inc(completed)
            metrics.JOB_ITEMS.labels(status="failed").inc(failed)
        metrics.JOB_CHUNK_SECONDS.observe(time.perf_counter() - started)

    async def _expire_chunk(self, batch_id: str, index: int) -> None:
        """The completion window has passed: this chunk's requests become batch_expired
        entries of the error file (committed like a computed chunk, so exactly once)."""
        if await self._store.chunk_done(batch_id, index):
            return
        directory = self._storage.batch_dir(batch_id)
        requests = await asyncio.to_thread(_chunk_requests, directory / chunk_name(index, "in"))
        expired = [_expired_entry(batch_id, request) for request in requests]
        await asyncio.to_thread(_write_results, directory, index, [], expired)
        await self._store.update_batch(batch_id, {"_expired": True})
        if await self._store.commit_chunk(batch_id, index, 0, len(expired)):
            metrics.JOB_ITEMS.labels(status="expired").inc(len(expired))

    async def _compute_chunk(self, batch_id: str, index: int) -> tuple[int, int]:
        directory = self._storage.batch_dir(batch_id)
        source = directory / chunk_name(index, "in")
        requests = await asyncio.to_thread(_chunk_requests, source)
        # All at once: the micro-batcher coalesces the chunk's inputs into full model batches.
        entries = await asyncio.gather(*(self._answer(batch_id, request) for request in requests))
        good = [entry for entry in entries if entry["response"]["status_code"] == 200]
        bad = [entry for entry in entries if entry["response"]["status_code"] != 200]
        # In a thread: serialising a chunk's vectors would stall every online request.
        await asyncio.to_thread(_write_results, directory, index, good, bad)
        return len(good), len(bad)

    async def _answer(self, batch_id: str, request: JsonDict) -> JsonDict:
        custom_id = request["custom_id"]
        req_id = request_id(batch_id, custom_id)
        status, body = 200, None
        try:
            body = await self._answer_body(request)
        except ValidationError as invalid:
            first = invalid.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            status, body = (
                400,
                _envelope(f"'{param}': {first['msg']}.", "invalid_request_error", param),
            )
        except (NotReady, Overloaded, UpstreamRateLimited, UpstreamUnavailable):
            raise  # transient: the chunk is not committed and runs again
        except EmbedpipeError as error:
            status, type_ = status_for(error)
            body = _envelope(error.message, type_, error.param, error.code)
        except Exception:
            log.exception("batch %s: request %s failed", batch_id, req_id)
            status = 500
            body = _envelope("The server had an error processing your request.", "server_error")
        return {
            "id": f"batch_req_{req_id}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": req_id, "body": body},
            "error": None,
        }

    async def _answer_body(self, request: JsonDict) -> dict[str, Any]:
        if request.get("url") == "/v1/rerank":
            if self._rerank is None:
                raise InvalidInput("This server answers no rerank lines.", param="url")
            rerank, ranked = self._rerank, RerankRequest.model_validate(request["body"])
            return await when_there_is_room(lambda: rerank(ranked))
        parsed = EmbeddingRequest.model_validate(request["body"])
        return await when_there_is_room(lambda: self._embed(parsed))

    # -- finalize --------------------------------------------------------------------------

    async def maybe_finalize(self, batch_id: str) -> None:
        batch = await self._store.get_batch(batch_id)
        if batch is None or batch["status"] not in ("in_progress", "cancelling", "finalizing"):
            return
        counts = await self._store.chunk_counts(batch_id)
        if counts.done < int(batch.get("_chunk_count", 1 << 60)):
            return
        if not await self._store.claim_finalize(batch_id):
            return
        await self.finalize(batch_id)

    async def finalize(self, batch_id: str) -> None:
        """Assemble output and error files; idempotent (file ids derive from the batch id)."""
        batch = await self._store.get_batch(batch_id)
        if batch is None:
            return
        cancelled = batch["status"] == "cancelling"
        expired = bool(batch.get("_expired"))
        if not cancelled:
            await self._store.transition(
                batch_id, "finalizing", ["in_progress"], {"finalizing_at": now()}
            )
        directory = self._storage.batch_dir(batch_id)
        chunk_count = int(batch["_chunk_count"])
        outputs = [directory / chunk_name(i, "out") for i in range(chunk_count)]
        errors = [directory / PREPARE_ERRORS]
        errors += [directory / chunk_name(i, "err") for i in range(chunk_count)]
        owner = batch.get("_owner")
        lifetime = batch.get("_output_lifetime")  # the batch's output_expires_after
        output_file_id = await self._publish(batch_id, "output", outputs, owner, lifetime)
        error_file_id = await self._publish(batch_id, "error", errors, owner, lifetime)
        counts = await self._store.chunk_counts(batch_id)
        fields: JsonDict = {
            "output_file_id": output_file_id,
            "error_file_id": error_file_id,
            "request_counts": {
                "total": batch["request_counts"]["total"],
                "completed": counts.completed,
                "failed": counts.failed + int(batch.get("_prepare_failed", 0)),
            },
        }
        if cancelled:
            await self._store.transition(
                batch_id, "cancelled", ["cancelling"], fields | {"cancelled_at": now()}
            )
            metrics.JOBS.labels(status="cancelled").inc()
        elif expired:
            await self._store.transition(
                batch_id, "expired", ["finalizing"], fields | {"expired_at": now()}
            )
            metrics.JOBS.labels(status="expired").inc()
        else:
            await self._store.transition(
                batch_id, "completed", ["finalizing"], fields | {"completed_at": now()}
            )
            metrics.JOBS.labels(status="completed").inc()
        # The chunk files hold the input texts: once the output is assembled they go, so that
        # deleting the batch's files deletes its data.
        await asyncio.to_thread(self._storage.remove_batch_dir, batch_id)
        log.info("batch %s finalized: %s", batch_id, fields["request_counts"])

    async def _publish(
        self,
        batch_id: str,
        kind: str,
        parts: list[Path],
        owner: str | None,
        lifetime_seconds: int | None = None,
    ) -> str | None:
        file_id = "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]
        size = await asyncio.to_thread(
            concatenate_atomically, self._storage.file_path(file_id), parts
        )
        if size == 0 and kind == "error":
            self._storage.delete_file(file_id)
            return None
        lifetime = int(lifetime_seconds or 0)
        await self._store.put_file(
            file_object(file_id, f"{batch_id}_{kind}.jsonl", "batch_output", size, owner, lifetime)
        )
        return file_id

    # -- cancel ----------------------------------------------------------------------------

    async def cancel(self, batch_id: str) -> bool:
        """Stop scheduling new chunks; running ones finish, the rest are skipped."""
        changed = await self._store.transition(
            batch_id, "cancelling", ["validating", "in_progress"], {"cancelling_at": now()}
        )
        if changed:
            await self.maybe_finalize(batch_id)
        return changed


async def when_there_is_room(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, again after the wait it asks for while the model's queue (or an upstream)
    is full: batch work waits for room instead of failing, it has no deadline."""
    for attempt in range(_OVERLOAD_RETRIES):
        try:
            return await call()
        except (Overloaded, UpstreamRateLimited) as busy:
            if attempt == _OVERLOAD_RETRIES - 1:
                raise
            await asyncio.sleep(busy.retry_after)
    raise AssertionError("unreachable")


def _past_window(batch: JsonDict) -> bool:
    expires_at = batch.get("expires_at")
    return isinstance(expires_at, int | float) and now() >= expires_at


def _write_results(directory: Path, index: int, good: list[JsonDict], bad: list[JsonDict]) -> None:
    # make_parents=False: a batch that ended meanwhile (its directory removed) is not brought
    # back by a late duplicate run; that run fails and then finds the batch over.
    write_atomically(directory / chunk_name(index, "out"), map(_line, good), False)
    write_atomically(directory / chunk_name(index, "err"), map(_line, bad), False)


def _chunk_requests(path: Path) -> list[JsonDict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def _expired_entry(batch_id: str, request: JsonDict) -> JsonDict:
    custom_id = request["custom_id"]
    return {
        "id": f"batch_req_{request_id(batch_id, custom_id)}",
        "custom_id": custom_id,
        "response": None,
        "error": problem(
            "batch_expired", "The batch expired before this request could be processed."
        ),
    }


def _crashed(what: str, times: int) -> JsonDict:
    return problem(
        "crashed",
        f"{what} stopped the process running it {times} times (killed, e.g. out of memory); "
        "the batch failed instead of being retried again.",
    )


def _envelope(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> JsonDict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _line(entry: JsonDict) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
