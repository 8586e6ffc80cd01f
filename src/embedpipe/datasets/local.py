"""``embedpipe embed`` in process: a dataset file through the service's cache and batcher.

read -> chunks of ``chunk_size`` rows -> ``service.embed`` with a few chunks in flight (so the
micro-batcher always has texts to group by length) -> each chunk committed atomically as a
part file -> the parts assembled, in input order, into the output.

Resumable: the work dir ``OUTPUT.parts/`` holds a manifest (the input's path, size and
mtime, and a fingerprint of everything that changes the vectors or the chunking) and one
Arrow part per finished chunk, written to a temporary name, fsynced and renamed. A run killed
at any instant leaves only whole parts; the next run with the same input and options embeds
the missing chunks only, so no row is lost or written twice. When the output is assembled the
parts are deleted and the manifest records the result: running the job again is a no-op.
Memory is bounded by the chunks in flight and one Parquet row group, whatever the input size.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from rich.console import Console

from embedpipe.datasets.formats import (
    BadRow,
    Matrix,
    OutputFormat,
    Row,
    RowReader,
    input_kind,
    open_reader,
    open_writer,
)
from embedpipe.datasets.options import RequestOptions
from embedpipe.datasets.progress import JobReport, ProgressUpdate, RichProgress
from embedpipe.datasets.workdir import WorkDir, file_identity, fsync_dir
from embedpipe.embedders import parse_model_specs
from embedpipe.errors import DatasetError
from embedpipe.operations.model_inputs import InputOptions, model_inputs
from embedpipe.quantization import EmbeddingType, check_output_type, output_layout, served_as
from embedpipe.service import EmbeddingService, EmbedResult
from embedpipe.settings import LimitsSettings, Settings

OnError = Literal["skip", "fail"]

MANIFEST_VERSION = 1
# Chunks embedding at once: enough that the batcher never waits for the next chunk to be
# read and looked up in the cache, few enough that memory stays flat.
MAX_CHUNKS_IN_FLIGHT = 4
# A dataset pass meets most texts once and the L2 keeps them all: a big L1 would only make
# the process's memory grow with the input (unless the operator sized it on purpose).
EMBED_L1_MAX_BYTES = 32 * 1024 * 1024
MAX_BAD_ROW_WARNINGS = 20


@dataclass(frozen=True, slots=True)
class EmbedJob:
    input: Path
    output: Path
    format: OutputFormat
    model: str
    text_field: str = "text"
    id_field: str | None = None
    chunk_size: int = 256
    on_error: OnError = "fail"
    # As on /v1/embeddings: the model's prompt for this kind of text, and long texts.
    request: RequestOptions = field(default_factory=RequestOptions)
    # Applied when the output is assembled: the parts stay float32.
    embedding_type: EmbeddingType = "float32"

    @property
    def work_dir(self) -> Path:
        return self.output.with_name(self.output.name + ".parts")


def default_output(input_path: Path) -> Path:
    """``corpus.jsonl.gz`` -> ``corpus.embeddings.parquet``, next to the input."""
    name = input_path.name
    for suffix in reversed(input_path.suffixes[-2:]):
        if suffix.lower() in (".gz", ".jsonl", ".ndjson", ".csv", ".parquet", ".txt"):
            name = name.removesuffix(suffix)
    return input_path.with_name(f"{name}.embeddings.parquet")


@dataclass(slots=True)
class _Chunk:
    index: int
    rows: list[Row] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    end_position: int = 0


def _chunks(reader: RowReader, size: int) -> Generator[_Chunk, None, None]:
    """Chunk k holds input rows [k*size, (k+1)*size): fixed by the input, so a resumed run
    cuts exactly the same chunks."""
    chunk = _Chunk(0)
    for row in reader:
        index = row.number // size
        if index != chunk.index:
            chunk.end_position = reader.position
            yield chunk
            chunk = _Chunk(index)
        if isinstance(row, Row):
            chunk.rows.append(row)
        else:
            chunk.bad.append(row)
    if chunk.rows or chunk.bad:
        chunk.end_position = reader.position
        yield chunk


ProgressCallback = Callable[[ProgressUpdate], None]
BadRowCallback = Callable[[BadRow], None]


async def run_embed_job(
    service: EmbeddingService,
    job: EmbedJob,
    *,
    max_queue_texts: int = 8192,
    limits: LimitsSettings | None = None,
    on_progress: ProgressCallback | None = None,
    on_bad_row: BadRowCallback | None = None,
) -> JobReport:
    """Embed ``job.input`` into ``job.output``, resuming an interrupted run of the same job.

    Raises :class:`DatasetError` for an unusable input or, with ``on_error="fail"``, at the
    first bad row (the chunks before it stay committed).
    """
    started = time.perf_counter()
    input_kind(job.input)  # an unknown extension fails before any work
    if job.input.resolve() == job.output.resolve():
        raise DatasetError("the output would overwrite the input")
    model = service.resolve_model(job.model, route="/v1/embeddings")
    embedder = service.models.get(model)
    dims = embedder.info.dimensions
    calibration = service.calibration(model)
    check_output_type(job.embedding_type, dims, calibration, param="--embedding-type")
    # An unknown input type fails before any work.
    request = job.request
    inputs = InputOptions(
        prompt=embedder.prompts.resolve(request.input_type), long_text=request.long_text
    )
    options = {
        **request.fields,
        "model": model,
        "model_fingerprint": embedder.fingerprint,
        "text_field": job.text_field,
        "id_field": job.id_field,
        "chunk_size": job.chunk_size,
        "on_error": job.on_error,
        # Only when asked: the float32 job keys of earlier runs stay valid.
        **({"embedding_type": job.embedding_type} if job.embedding_type != "float32" else {}),
    }
    identity = {"version": MANIFEST_VERSION, "input": file_identity(job.input), **options}
    request_limits = limits or LimitsSettings()

    async def embed_texts(texts: Sequence[str]) -> EmbedResult:
        """As /v1/embeddings embeds them: prompt, window (or windows), cache and model."""
        prepared = await model_inputs(service, model, texts, inputs, request_limits)
        # durable: a chunk is committed with its vectors in the cache (a rerun after a kill
        # finds every committed row there).
        result = await service.embed(
            model, prepared.texts, prepared.tokens, form=prepared.form, durable=True
        )
        return prepared.combine(result)

    job_key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    progress = ProgressUpdate()
    report = on_progress or (lambda update: None)

    with WorkDir(job.work_dir) as work:
        manifest = work.read_manifest()
        if manifest is not None and manifest.get("job_key") == job_key:
            done = _finished(manifest, job)
            if done is not None:
                rows, skipped = done
                return JobReport(
                    job.output, rows, skipped, 0, rows, 0, time.perf_counter() - started, True
                )
            committed = work.committed()
        else:
            work.clear_parts()
            work.write_manifest({"job_key": job_key, "state": "running", **identity})
            committed = set()

        with open_reader(job.input, text_field=job.text_field, id_field=job.id_field) as reader:
            progress.total = reader.total
            n_chunks = await _embed_chunks(
                embed_texts,
                job,
                work,
                reader,
                committed,
                progress,
                report,
                on_bad_row,
                dims=dims,
                in_flight=max(1, min(MAX_CHUNKS_IN_FLIGHT, max_queue_texts // job.chunk_size)),
                slice_size=max_queue_texts,
            )
            id_type = reader.id_type

        metadata = {
            "embedpipe.model": model,
            "embedpipe.model_fingerprint": embedder.fingerprint,
            "embedpipe.embedding_type": job.embedding_type,
        }

        def shape(vectors: Matrix) -> npt.NDArray[Any]:
            return served_as(model, vectors, job.embedding_type, calibration)

        rows, skipped = await asyncio.to_thread(
            _assemble, work, job, n_chunks, dims, id_type, metadata, shape
        )
        output = file_identity(job.output)
        work.write_manifest(
            {
                "job_key": job_key,
                "state": "complete",
                **identity,
                "result": {"format": job.format, "rows": rows, "skipped": skipped, **output},
            }
        )
        work.clear_parts()
    resumed = rows - progress.embedded
    return JobReport(
        output=job.output,
        rows=rows,
        skipped=skipped,
        embedded=progress.embedded,
        resumed=max(0, resumed),
        cache_hits=progress.cache_hits,
        seconds=time.perf_counter() - started,
    )


def _finished(manifest: dict[str, Any], job: EmbedJob) -> tuple[int, int] | None:
    """(rows, skipped) when the manifest says this job is done and its output is untouched."""
    result = manifest.get("result")
    if manifest.get("state") != "complete" or not isinstance(result, dict):
        return None
    try:
        output = file_identity(job.output)
    except OSError:
        return None
    same = result.get("format") == job.format and all(
        result.get(key) == output[key] for key in ("path", "size", "mtime_ns")
    )
    return (int(result["rows"]), int(result["skipped"])) if same else None


async def _embed_chunks(
    embed_texts: Callable[[Sequence[str]], Awaitable[EmbedResult]],
    job: EmbedJob,
    work: WorkDir,
    reader: RowReader,
    committed: set[int],
    progress: ProgressUpdate,
    report: ProgressCallback,
    on_bad_row: BadRowCallback | None,
    *,
    dims: int,
    in_flight: int,
    slice_size: int,
) -> int:
    """Embed and commit every chunk not committed yet; returns the number of chunks."""
    loop = asyncio.get_running_loop()
    # One thread reads the input, so the event loop never blocks on it; it is joined before
    # the reader closes, so a file is never closed under a read.
    read_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-reader")
    # Part files are written here; shut down (waited for) before returning, so no part from a
    # cancelled chunk lands after the job has ended.
    commit_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-commit")
    chunks = _chunks(reader, job.chunk_size)
    running: set[asyncio.Task[None]] = set()
    n_chunks = 0

    async def embed_and_commit(chunk: _Chunk) -> None:
        texts = [row.text for row in chunk.rows]
        vectors = np.empty((len(texts), dims), dtype=np.float32)
        hits = 0
        for start in range(0, len(texts), slice_size):
            result = await embed_texts(texts[start : start + slice_size])
            vectors[start : start + len(result.vectors)] = result.vectors
            hits += result.cached_count
        ids = pa.array([row.id for row in chunk.rows], type=reader.id_type)
        await loop.run_in_executor(
            commit_thread, work.commit, chunk.index, ids, vectors, len(chunk.bad), ids.type
        )
        progress.rows += len(texts)
        progress.embedded += len(texts)
        progress.cache_hits += hits
        progress.skipped += len(chunk.bad)
        progress.position = max(progress.position, chunk.end_position)
        report(progress)

    try:
        while True:
            chunk = await loop.run_in_executor(read_thread, next, chunks, None)
            if chunk is None:
                break
            n_chunks = chunk.index + 1
            if chunk.index in committed:
                progress.rows += len(chunk.rows)
                progress.skipped += len(chunk.bad)
                progress.position = max(progress.position, chunk.end_position)
                report(progress)
                continue
            if chunk.bad and job.on_error == "fail":
                raise DatasetError(
                    f"{chunk.bad[0].describe()} in {job.input.name}; fix the input, or pass "
                    "--on-error skip to leave such rows out"
                )
            for bad in chunk.bad:
                if on_bad_row is not None:
                    on_bad_row(bad)
            task = asyncio.create_task(embed_and_commit(chunk), name=f"chunk-{chunk.index}")
            running.add(task)
            if len(running) >= in_flight:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                _raise_first_error(done)
        if running:
            done, running = await asyncio.wait(running)
            _raise_first_error(done)
        progress.position = progress.total
        report(progress)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        # Wait for a read in progress (one chunk at most) before the reader is closed.
        await loop.run_in_executor(None, read_thread.shutdown)
        await loop.run_in_executor(None, commit_thread.shutdown)
        chunks.close()
    return n_chunks


def _raise_first_error(done: set[asyncio.Task[None]]) -> None:
    """Re-raise a finished chunk's error; every task's error is retrieved (none is logged
    as "never retrieved")."""
    errors = [task.exception() for task in done]
    for error in errors:
        if error is not None:
            raise error


def _assemble(
    work: WorkDir,
    job: EmbedJob,
    n_chunks: int,
    dims: int,
    id_type: pa.DataType,
    metadata: dict[str, str],
    shape: Callable[[Matrix], npt.NDArray[Any]],
) -> tuple[int, int]:
    """Concatenate parts 0..n-1 into the output (written aside, then renamed into place),
    each part's vectors made the job's output type by ``shape``."""
    missing = set(range(n_chunks)) - work.committed()
    if missing:
        raise DatasetError(f"internal error: chunks {sorted(missing)[:5]} were never committed")
    counts = [work.part_counts(index) for index in range(n_chunks)]
    rows = sum(count for count, _ in counts)
    skipped = sum(bad for _, bad in counts)
    tmp = work.path / f"assembling-{job.output.name}"
    width, dtype = output_layout(job.embedding_type, dims)
    with open_writer(
        tmp, job.format, dims=width, id_type=id_type, rows=rows, metadata=metadata, dtype=dtype
    ) as writer:
        for index in range(n_chunks):
            ids, vectors, _ = work.read_part(index)
            writer.write(ids, shape(vectors))
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, job.output)
    fsync_dir(job.output.parent)
    return rows, skipped


def settings_for_embed(settings: Settings, model: str | None) -> Settings:
    """The process's settings narrowed to one dataset job: only ``model`` (a served name or
    alias, or a sentence-transformers directory; default ``EMBEDPIPE_MODEL``) is loaded."""
    source = settings.model
    if model:
        specs = parse_model_specs(settings.model, settings.extra_models, settings.backend)
        source = next((spec.source for spec in specs if model in (spec.name, *spec.aliases)), model)
    cache = settings.cache
    if "l1_max_bytes" not in cache.model_fields_set:
        cache = cache.model_copy(
            update={"l1_max_bytes": min(cache.l1_max_bytes, EMBED_L1_MAX_BYTES)}
        )
    return settings.model_copy(update={"model": source, "extra_models": "", "cache": cache})


async def embed_file(
    settings: Settings,
    *,
    input_path: Path,
    output: Path,
    fmt: OutputFormat,
    text_field: str,
    id_field: str | None,
    chunk_size: int,
    on_error: OnError,
    console: Console,
    quiet: bool,
    request: RequestOptions | None = None,
    embedding_type: EmbeddingType = "float32",
) -> JobReport:
    """Open the process's runtime (model, cache, batcher), run one job, close it."""
    from embedpipe.runtime import Runtime

    runtime = await Runtime.open(settings)
    try:
        job = EmbedJob(
            input=input_path,
            output=output,
            format=fmt,
            model=runtime.default_model,
            text_field=text_field,
            id_field=id_field,
            chunk_size=chunk_size,
            on_error=on_error,
            request=request or RequestOptions(),
            embedding_type=embedding_type,
        )
        warned = 0

        def warn(bad: BadRow) -> None:
            nonlocal warned
            warned += 1
            if warned <= MAX_BAD_ROW_WARNINGS:
                console.print(f"[yellow]skipped {bad.describe()}", highlight=False)
            elif warned == MAX_BAD_ROW_WARNINGS + 1:
                console.print("[yellow]more bad rows skipped; the summary counts them")

        run = functools.partial(
            run_embed_job,
            runtime.service,
            job,
            max_queue_texts=settings.batching.max_queue_texts,
            limits=settings.limits,
            on_bad_row=warn,
        )
        if quiet:
            return await run()
        with RichProgress(console, f"embedding {input_path.name}") as bar:
            return await run(on_progress=bar.update)
    finally:
        await runtime.close()
