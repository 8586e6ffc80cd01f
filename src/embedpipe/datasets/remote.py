"""``embedpipe embed --server URL``: a dataset file as Batch API jobs on a running embedpipe.

read the input -> segments of at most ``batch_rows`` rows / ``batch_bytes`` bytes, each
uploaded (``files.create(purpose="batch")``) and submitted as one batch -> follow every
batch's ``request_counts`` on a progress bar -> stream the output files back into the output
(Parquet, ``.npy`` or JSONL), in input order.

It talks to the server with the official ``openai`` SDK, so any server of the OpenAI Batch API
for ``/v1/embeddings`` would do. One request line per row, ``custom_id`` = the row's id,
``encoding_format=base64`` (the exact float32 bytes, a third of the JSON floats' size).

Resumable: ``OUTPUT.remote.json`` records the server, the input's identity and the batch of
every submitted segment. Interrupted (Ctrl-C, a lost connection), the batches keep running on
the server; the same command picks them up instead of submitting the input again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from openai import OpenAI, OpenAIError
from openai.types import Batch

from embedpipe.datasets.formats import (
    BadRow,
    OutputFormat,
    Row,
    RowId,
    RowReader,
    input_kind,
    open_reader,
    open_writer,
)
from embedpipe.datasets.options import RequestOptions
from embedpipe.datasets.progress import JobReport, ProgressUpdate
from embedpipe.datasets.workdir import atomic_write, file_identity, fsync_dir
from embedpipe.errors import DatasetError
from embedpipe.quantization import EmbeddingType, output_layout

STATE_VERSION = 1
# The server's default limits per batch (EMBEDPIPE_JOBS__MAX_REQUESTS_PER_BATCH, 50,000, and
# a 200 MB file): stay below both.
DEFAULT_BATCH_ROWS = 50_000
DEFAULT_BATCH_BYTES = 64 * 1024 * 1024
_WRITE_ROWS = 8192  # rows buffered per write into the output
_FINAL = ("completed", "failed", "expired", "cancelled")
MAX_ERRORS_SHOWN = 20

ProgressCallback = Callable[[ProgressUpdate], None]
Notice = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class RemoteJob:
    server: str  # the service's base URL, e.g. http://host:8000
    input: Path
    output: Path
    format: OutputFormat
    model: str | None = None  # None: the first model the server lists (its default)
    text_field: str = "text"
    id_field: str | None = None
    on_error: str = "fail"
    batch_rows: int = DEFAULT_BATCH_ROWS
    batch_bytes: int = DEFAULT_BATCH_BYTES
    poll_seconds: float = 1.0
    request: RequestOptions = field(default_factory=RequestOptions)
    # Asked of the server in every line (it holds the model's int8 ranges).
    embedding_type: EmbeddingType = "float32"

    @property
    def state_path(self) -> Path:
        return self.output.with_name(self.output.name + ".remote.json")


def run_remote_job(
    client: OpenAI,
    job: RemoteJob,
    *,
    on_progress: ProgressCallback | None = None,
    on_bad_row: Callable[[BadRow], None] | None = None,
    notice: Notice | None = None,
) -> JobReport:
    """Submit (or pick up) the job's batches, wait for them, write the output."""
    started = time.perf_counter()
    input_kind(job.input)
    if job.input.resolve() == job.output.resolve():
        raise DatasetError("the output would overwrite the input")
    say = notice or (lambda message: None)
    model = job.model or _default_model(client)
    identity = {
        "version": STATE_VERSION,
        "server": job.server.rstrip("/"),
        "input": file_identity(job.input),
        "model": model,
        "text_field": job.text_field,
        "id_field": job.id_field,
        "on_error": job.on_error,
        "batch_rows": job.batch_rows,
        "batch_bytes": job.batch_bytes,
        **job.request.fields,
        # Only when asked: the float32 job keys of earlier runs stay valid.
        **({"embedding_type": job.embedding_type} if job.embedding_type != "float32" else {}),
    }
    job_key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    state = _read_state(job.state_path)
    if state is None or state.get("job_key") != job_key:
        state = {"job_key": job_key, **identity, "batches": [], "submitted_all": False}
    elif _still_complete(state, job):
        rows = int(state["result"]["rows"])
        skipped = int(state["result"]["skipped"])
        return JobReport(job.output, rows, skipped, 0, rows, 0, 0.0, True, job.server)
    elif state["batches"]:
        say(f"picking up {len(state['batches'])} batch(es) submitted before")

    id_type, skipped = _submit(client, job, model, state, on_bad_row)
    batches = _follow(client, job, state["batches"], on_progress)
    rows, failed = _download(client, job, batches, id_type, model, say)
    result = {"format": job.format, "rows": rows, "skipped": skipped + failed}
    state["result"] = result | file_identity(job.output)
    _write_state(job.state_path, state)
    _delete_server_files(client, batches)
    return JobReport(
        output=job.output,
        rows=rows,
        skipped=skipped + failed,
        embedded=rows,
        resumed=0,
        cache_hits=0,
        seconds=time.perf_counter() - started,
        server=job.server,
    )


def _default_model(client: OpenAI) -> str:
    models = client.models.list().data
    if not models:
        raise DatasetError("the server serves no model")
    return models[0].id


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(state, indent=2).encode())


def _still_complete(state: dict[str, Any], job: RemoteJob) -> bool:
    result = state.get("result")
    if not isinstance(result, dict) or result.get("format") != job.format:
        return False
    try:
        output = file_identity(job.output)
    except OSError:
        return False
    return all(result.get(key) == output[key] for key in ("path", "size", "mtime_ns"))


# -- submit -----------------------------------------------------------------------------------


def _submit(
    client: OpenAI,
    job: RemoteJob,
    model: str,
    state: dict[str, Any],
    on_bad_row: Callable[[BadRow], None] | None,
) -> tuple[pa.DataType, int]:
    """Upload and create the batches not created yet; (id type, bad rows left out).

    A run killed between the server creating a batch and the state file recording it would
    submit that segment again: each batch carries the job's key and its segment number in its
    metadata, and a segment the server already has is adopted, not submitted twice."""
    already = len(state["batches"])
    job_tag = str(state["job_key"])[:32]
    on_server = _batches_of_job(client, job_tag)
    skipped = 0
    with open_reader(job.input, text_field=job.text_field, id_field=job.id_field) as reader:
        for index, segment in enumerate(_segments(reader, job, model)):
            skipped += len(segment.bad)
            if index < already:
                continue  # submitted by an earlier run
            for bad in segment.bad:
                if on_bad_row is not None:
                    on_bad_row(bad)
            if index in on_server:
                state["batches"].append(on_server[index])
                _write_state(job.state_path, state)
                continue
            upload = client.files.create(
                file=(f"{job.input.name}.part{index:05d}.jsonl", segment.lines.getvalue()),
                purpose="batch",
            )
            batch = client.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/embeddings",
                completion_window="24h",
                metadata={
                    "embedpipe_input": job.input.name[:256],
                    "embedpipe_job": job_tag,
                    "segment": str(index),
                },
            )
            state["batches"].append(batch.id)
            _write_state(job.state_path, state)  # before anything else can fail
        id_type = reader.id_type
    state["submitted_all"] = True
    _write_state(job.state_path, state)
    return id_type, skipped


_MAX_ADOPT_SCAN = 10_000  # batches listed when looking for this job's own


def _batches_of_job(client: OpenAI, job_tag: str) -> dict[int, str]:
    """Segment number -> batch id of the batches this job already has on the server."""
    found: dict[int, str] = {}
    for seen, batch in enumerate(client.batches.list(limit=100)):
        if seen >= _MAX_ADOPT_SCAN:
            break
        metadata = batch.metadata or {}
        segment = metadata.get("segment", "")
        if metadata.get("embedpipe_job") == job_tag and segment.isdigit():
            found.setdefault(int(segment), batch.id)  # newest first: keep the latest
    return found


@dataclass(slots=True)
class _Segment:
    lines: io.BytesIO = field(default_factory=io.BytesIO)
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)


def _segments(reader: RowReader, job: RemoteJob, model: str) -> Iterator[_Segment]:
    """The request file of each segment, cut by rows and bytes (the same cuts every run)."""
    segment = _Segment()
    for row in reader:
        if isinstance(row, BadRow):
            if job.on_error == "fail":
                raise DatasetError(
                    f"{row.describe()} in {job.input.name}; fix the input, or pass "
                    "--on-error skip to leave such rows out"
                )
            segment.bad.append(row)
            continue
        line = _request_line(row, model, job.request.fields, job.embedding_type)
        full = segment.rows >= job.batch_rows
        if segment.rows and (full or segment.lines.tell() + len(line) > job.batch_bytes):
            yield segment
            segment = _Segment()
        segment.lines.write(line)
        segment.rows += 1
    if segment.rows:
        yield segment


def _request_line(
    row: Row, model: str, fields: dict[str, str], embedding_type: EmbeddingType = "float32"
) -> bytes:
    body = {"model": model, "input": row.text, "encoding_format": "base64", **fields}
    if embedding_type != "float32":
        body["embedding_type"] = embedding_type
    request = {"custom_id": str(row.id), "method": "POST", "url": "/v1/embeddings", "body": body}
    return json.dumps(request, ensure_ascii=False).encode() + b"\n"


# -- follow -----------------------------------------------------------------------------------


def _follow(
    client: OpenAI, job: RemoteJob, batch_ids: list[str], on_progress: ProgressCallback | None
) -> list[Batch]:
    """Poll every batch until all are final; raise for one that did not complete."""
    latest: dict[str, Batch] = {}
    progress = ProgressUpdate()
    while True:
        for batch_id in batch_ids:
            known = latest.get(batch_id)
            if known is None or known.status not in _FINAL:
                latest[batch_id] = _retrieve(client, batch_id)
        counts = [batch.request_counts for batch in latest.values()]
        progress.total = sum(count.total for count in counts if count)
        progress.rows = progress.embedded = sum(
            count.completed + count.failed for count in counts if count
        )
        progress.position = progress.rows
        if on_progress is not None:
            on_progress(progress)
        if all(batch.status in _FINAL for batch in latest.values()):
            break
        time.sleep(job.poll_seconds)
    for batch in latest.values():
        if batch.status != "completed":
            reasons = (
                "; ".join(error.message or error.code or "" for error in (batch.errors.data or []))
                if batch.errors
                else ""
            )
            raise DatasetError(
                f"batch {batch.id} ended {batch.status}"
                + (f": {reasons}" if reasons else "")
                + f". Delete {job.state_path.name} to submit the input again."
            )
    return [latest[batch_id] for batch_id in batch_ids]


def _retrieve(client: OpenAI, batch_id: str) -> Batch:
    for attempt in range(5):
        try:
            return client.batches.retrieve(batch_id)
        except OpenAIError:
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


# -- download ---------------------------------------------------------------------------------


def _download(
    client: OpenAI,
    job: RemoteJob,
    batches: list[Batch],
    id_type: pa.DataType,
    model: str,
    say: Notice,
) -> tuple[int, int]:
    """Stream the output files into ``job.output``; (rows written, requests that failed)."""
    failed = _report_errors(client, batches, say)
    if failed and job.on_error == "fail":
        raise DatasetError(
            f"{failed} row(s) failed on the server (listed above); pass --on-error skip to "
            "write the others"
        )
    rows = sum(batch.request_counts.completed for batch in batches if batch.request_counts)
    if rows == 0:
        raise DatasetError("no row was embedded")
    lines = _output_lines(client, batches)
    first = next(lines, None)
    if first is None:
        raise DatasetError(f"the server's output files hold no rows, expected {rows}")
    dtype = output_layout(job.embedding_type, 0)[1]
    dims = int(_vector(first, dtype).shape[0])
    tmp = job.output.with_name(f".{job.output.name}.downloading")
    written = 0
    metadata = {
        "embedpipe.model": model,
        "embedpipe.server": job.server,
        "embedpipe.embedding_type": job.embedding_type,
    }
    with open_writer(
        tmp, job.format, dims=dims, id_type=id_type, rows=rows, metadata=metadata, dtype=dtype
    ) as writer:
        ids: list[RowId] = []
        vectors: list[np.ndarray] = []
        for line in itertools.chain([first], lines):
            ids.append(int(line["custom_id"]) if id_type == pa.int64() else line["custom_id"])
            vectors.append(_vector(line, dtype))
            if len(ids) == _WRITE_ROWS:
                writer.write(ids, np.stack(vectors))
                written += len(ids)
                ids, vectors = [], []
        if ids:
            writer.write(ids, np.stack(vectors))
            written += len(ids)
    if written != rows:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"the server's output files hold {written} rows, expected {rows}")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, job.output)
    fsync_dir(job.output.parent)
    return rows, failed


def _output_lines(client: OpenAI, batches: list[Batch]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        if batch.output_file_id is None:
            continue
        with client.files.with_streaming_response.content(batch.output_file_id) as response:
            for text in response.iter_lines():
                if text:
                    yield json.loads(text)


def _vector(line: dict[str, Any], dtype: np.dtype[Any]) -> np.ndarray:
    """A line's vector: base64, the raw bytes of the asked type (``dtype``)."""
    embedding = line["response"]["body"]["data"][0]["embedding"]
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype=dtype)
    return np.asarray(embedding, dtype=dtype)


def _report_errors(client: OpenAI, batches: list[Batch], say: Notice) -> int:
    failed = 0
    for batch in batches:
        if batch.error_file_id is None:
            continue
        with client.files.with_streaming_response.content(batch.error_file_id) as response:
            for text in response.iter_lines():
                if not text:
                    continue
                failed += 1
                if failed <= MAX_ERRORS_SHOWN:
                    say(f"row {_describe_error(json.loads(text))}")
    if failed > MAX_ERRORS_SHOWN:
        say(f"... and {failed - MAX_ERRORS_SHOWN} more failed rows")
    return failed


def _describe_error(entry: dict[str, Any]) -> str:
    error = entry.get("error") or ((entry.get("response") or {}).get("body") or {}).get("error")
    message = error.get("message") if isinstance(error, dict) else str(error)
    return f"{entry.get('custom_id')!r} failed: {message}"


def _delete_server_files(client: OpenAI, batches: list[Batch]) -> None:
    """The server keeps nothing of a finished job (best effort: it expires them anyway)."""
    for batch in batches:
        for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
            if file_id:
                with contextlib.suppress(OpenAIError):
                    client.files.delete(file_id)
