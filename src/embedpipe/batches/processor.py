"""The life of a batch, independent of where it runs (in the server or on Celery workers).

    validating --prepare--> in_progress --chunks--> finalizing --> completed
         |                       |                        |
         +--> failed             |                        +--(a chunk expired)--> expired
                                 +--cancel--> cancelling --chunks skipped--> cancelled

``prepare`` checks every line and splits the valid requests into chunk files. ``run_chunk``
computes one chunk and commits its output atomically; a chunk run twice (a retried or
duplicated task) produces the same files and counts once. Whoever commits the last chunk
assembles the output and error files.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from embedpipe import metrics
from embedpipe.batches.objects import JsonDict, file_object, now
from embedpipe.batches.storage import Storage, concatenate_atomically, write_atomically
from embedpipe.batches.store import JobStore
from embedpipe.error_status import status_for
from embedpipe.errors import (
    EmbedpipeError,
    NotReady,
    Overloaded,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from embedpipe.operations.openai_embeddings import EmbeddingRequest
from embedpipe.settings import JobsSettings
from embedpipe.tenancy import serving_tenant

log = logging.getLogger("embedpipe.batches")

# One embeddings request body in, the response body out (raises EmbedpipeError).
EmbedRequest = Callable[[EmbeddingRequest], Awaitable[dict[str, Any]]]

_OVERLOAD_RETRIES = 30


class BatchProcessor:
    def __init__(
        self, store: JobStore, storage: Storage, settings: JobsSettings, embed: EmbedRequest
    ) -> None:
        self._store = store
        self._storage = storage
        self._settings = settings
        self._embed = embed

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
        source = self._storage.file_path(batch["input_file_id"])
        try:
            chunks, problems, total = await asyncio.to_thread(self._split, batch_id, source)
        except OSError:
            log.exception("batch %s: cannot read its input file", batch_id)
            await self._fail(batch_id, [_problem("file_unreadable", "The input file is gone.")])
            return 0
        if not chunks:
            shown = problems[:20] or [_problem("empty_file", "The input file holds no requests.")]
            await self._fail(batch_id, [entry.get("error", entry) for entry in shown])
            return 0
        if total > self._settings.max_requests_per_batch:
            await self._fail(
                batch_id,
                [
                    _problem(
                        "too_many_requests",
                        f"The file holds {total} requests; at most "
                        f"{self._settings.max_requests_per_batch} are allowed.",
                    )
                ],
            )
            return 0
        directory = self._storage.batch_dir(batch_id)
        write_atomically(directory / "prepare.err.jsonl", (_line(entry) for entry in problems))
        await self._store.update_batch(
            batch_id, {"_chunk_count": chunks, "_prepare_failed": len(problems)}
        )
        counts = {"total": total, "completed": 0, "failed": len(problems)}
        await self._store.transition(
            batch_id,
            "in_progress",
            ["validating"],
            {"in_progress_at": now(), "request_counts": counts},
        )
        return chunks

    def _split(self, batch_id: str, source: Path) -> tuple[int, list[JsonDict], int]:
        """Chunk files of valid requests; error entries for the invalid lines; line count."""
        directory = self._storage.batch_dir(batch_id)
        problems: list[JsonDict] = []
        seen: set[str] = set()
        pending: list[bytes] = []
        chunks = total = 0
        with source.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                total += 1
                request, problem = _parse_line(raw, seen)
                if problem is not None or request is None:
                    problems.append(_error_entry(batch_id, number, request, problem or {}))
                    continue
                pending.append(orjson.dumps(request | {"_line": number}) + b"\n")
                if len(pending) == self._settings.chunk_size:
                    write_atomically(directory / f"chunk-{chunks:06d}.in.jsonl", pending)
                    chunks, pending = chunks + 1, []
        if pending:
            write_atomically(directory / f"chunk-{chunks:06d}.in.jsonl", pending)
            chunks += 1
        return chunks, problems, total

    async def _fail(self, batch_id: str, errors: list[JsonDict]) -> None:
        await self._store.transition(
            batch_id,
            "failed",
            ["validating"],
            {"failed_at": now(), "errors": {"object": "list", "data": errors}},
        )
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
            started = time.perf_counter()
            with serving_tenant(batch.get("_owner")):  # its cache namespace, if per tenant
                completed, failed = await self._compute_chunk(batch_id, index)
            if await self._store.commit_chunk(batch_id, index, completed, failed):
                metrics.JOB_ITEMS.labels(status="succeeded").inc(completed)
                metrics.JOB_ITEMS.labels(status="failed").inc(failed)
            metrics.JOB_CHUNK_SECONDS.observe(time.perf_counter() - started)
        await self.maybe_finalize(batch_id)

    async def _expire_chunk(self, batch_id: str, index: int) -> None:
        """The completion window has passed: this chunk's requests become batch_expired
        entries of the error file (committed like a computed chunk, so exactly once)."""
        if await self._store.chunk_done(batch_id, index):
            return
        directory = self._storage.batch_dir(batch_id)
        requests = _chunk_requests(directory / f"chunk-{index:06d}.in.jsonl")
        expired = [_expired_entry(batch_id, request) for request in requests]
        write_atomically(directory / f"chunk-{index:06d}.out.jsonl", [])
        write_atomically(directory / f"chunk-{index:06d}.err.jsonl", map(_line, expired))
        await self._store.update_batch(batch_id, {"_expired": True})
        if await self._store.commit_chunk(batch_id, index, 0, len(expired)):
            metrics.JOB_ITEMS.labels(status="expired").inc(len(expired))

    async def _compute_chunk(self, batch_id: str, index: int) -> tuple[int, int]:
        directory = self._storage.batch_dir(batch_id)
        source = directory / f"chunk-{index:06d}.in.jsonl"
        requests = _chunk_requests(source)
        # All at once: the micro-batcher coalesces the chunk's inputs into full model batches.
        entries = await asyncio.gather(*(self._answer(batch_id, request) for request in requests))
        good = [entry for entry in entries if entry["response"]["status_code"] == 200]
        bad = [entry for entry in entries if entry["response"]["status_code"] != 200]
        write_atomically(directory / f"chunk-{index:06d}.out.jsonl", map(_line, good))
        write_atomically(directory / f"chunk-{index:06d}.err.jsonl", map(_line, bad))
        return len(good), len(bad)

    async def _answer(self, batch_id: str, request: JsonDict) -> JsonDict:
        custom_id = request["custom_id"]
        request_id = _request_id(batch_id, custom_id)
        status, body = 200, None
        try:
            parsed = EmbeddingRequest.model_validate(request["body"])
            for attempt in range(_OVERLOAD_RETRIES):
                try:
                    body = await self._embed(parsed)
                    break
                except (Overloaded, UpstreamRateLimited) as busy:
                    # Batch work waits for room instead of failing: it has no deadline.
                    if attempt == _OVERLOAD_RETRIES - 1:
                        raise
                    await asyncio.sleep(busy.retry_after)
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
            log.exception("batch %s: request %s failed", batch_id, request_id)
            status = 500
            body = _envelope("The server had an error processing your request.", "server_error")
        return {
            "id": f"batch_req_{request_id}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }

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
        outputs = [directory / f"chunk-{i:06d}.out.jsonl" for i in range(chunk_count)]
        errors = [directory / "prepare.err.jsonl"]
        errors += [directory / f"chunk-{i:06d}.err.jsonl" for i in range(chunk_count)]
        owner = batch.get("_owner")
        output_file_id = await self._publish(batch_id, "output", outputs, owner)
        error_file_id = await self._publish(batch_id, "error", errors, owner)
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
        log.info("batch %s finalized: %s", batch_id, fields["request_counts"])

    async def _publish(
        self, batch_id: str, kind: str, parts: list[Path], owner: str | None
    ) -> str | None:
        file_id = "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]
        size = await asyncio.to_thread(
            concatenate_atomically, self._storage.file_path(file_id), parts
        )
        if size == 0 and kind == "error":
            self._storage.delete_file(file_id)
            return None
        await self._store.put_file(
            file_object(file_id, f"{batch_id}_{kind}.jsonl", "batch_output", size, owner)
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


def _past_window(batch: JsonDict) -> bool:
    expires_at = batch.get("expires_at")
    return isinstance(expires_at, int | float) and now() >= expires_at


def _chunk_requests(path: Path) -> list[JsonDict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def _expired_entry(batch_id: str, request: JsonDict) -> JsonDict:
    custom_id = request["custom_id"]
    return {
        "id": f"batch_req_{_request_id(batch_id, custom_id)}",
        "custom_id": custom_id,
        "response": None,
        "error": _problem(
            "batch_expired", "The batch expired before this request could be processed."
        ),
    }


def _parse_line(raw: bytes, seen: set[str]) -> tuple[JsonDict | None, JsonDict | None]:
    """The request on a line, or what is wrong with it."""
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        return None, _problem("invalid_json", "The line is not valid JSON.")
    if not isinstance(request, dict):
        return None, _problem("invalid_request", "The line is not a JSON object.")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, _problem("missing_custom_id", "'custom_id' must be a non-empty string.")
    if not _storable(custom_id):
        return None, _UNSTORABLE
    if custom_id in seen:
        return request, _problem("duplicate_custom_id", f"'custom_id' {custom_id!r} is repeated.")
    seen.add(custom_id)
    if request.get("method") != "POST":
        return request, _problem("invalid_method", "'method' must be \"POST\".")
    if request.get("url") != "/v1/embeddings":
        return request, _problem("invalid_url", "'url' must be \"/v1/embeddings\".")
    if not isinstance(request.get("body"), dict):
        return request, _problem("invalid_body", "'body' must be a JSON object.")
    if not _storable(request["body"]):
        return request, _UNSTORABLE
    return {"custom_id": custom_id, "body": request["body"]}, None


def _storable(value: object) -> bool:
    """Whether orjson, which writes the chunk and result files, can write ``value``: Python's
    json reads unpaired surrogates (not Unicode), integers past 64 bits and nesting deeper
    than orjson's 254 levels, and one such line must not stop the whole batch."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def _problem(code: str, message: str) -> JsonDict:
    return {"code": code, "message": message}


_UNSTORABLE = _problem(
    "invalid_json",
    "The line is not JSON this service can read: it holds an unpaired UTF-16 surrogate, an "
    "integer beyond 64 bits or nesting deeper than 254 levels.",
)


def _error_entry(batch_id: str, line: int, request: JsonDict | None, problem: JsonDict) -> JsonDict:
    custom_id = request.get("custom_id") if isinstance(request, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) else None
    return {
        "id": f"batch_req_{_request_id(batch_id, f'line:{line}')}",
        "custom_id": custom_id,
        "response": None,
        "error": problem | {"line": line},
    }


def _request_id(batch_id: str, custom_id: str) -> str:
    # Deterministic, so a chunk computed twice writes identical lines.
    return hashlib.sha256(f"{batch_id}:{custom_id}".encode()).hexdigest()[:24]


def _envelope(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> JsonDict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _line(entry: JsonDict) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
