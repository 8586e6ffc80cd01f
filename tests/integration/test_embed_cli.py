"""``embedpipe embed``: the dataset pipeline in process, and the CLI against the real model.

The pipeline tests use a fake model (they check chunking, resumption and bad rows, not
vectors); the CLI tests run ``python -m embedpipe embed`` and check the output row by row
against the reference model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai import NotFoundError, OpenAI

from embedpipe.batcher import MicroBatcher
from embedpipe.cache import MemoryTier, TieredCache
from embedpipe.datasets.formats import OutputFormat
from embedpipe.datasets.local import EmbedJob, default_output, run_embed_job
from embedpipe.datasets.progress import JobReport, ProgressUpdate
from embedpipe.embedders import ModelRegistry, ModelSpec
from embedpipe.errors import DatasetError, InvalidInput, ModelFailed
from embedpipe.quantization import Calibration, quantize
from embedpipe.service import EmbeddingService
from embedpipe.settings import BatchingSettings, CacheSettings
from tests.fakes import FakeEmbedder, vector_for
from tests.integration.conftest import assert_same_vectors, reference_vectors
from tests.server_process import ServerProcess, free_port


def read_output(path: Path) -> tuple[list[Any], np.ndarray]:
    """(ids, vectors) of any output format (``.npy`` has no ids: None)."""
    if path.suffix == ".npy":
        vectors = np.load(path)
        return [None] * len(vectors), vectors
    if path.suffix == ".jsonl":
        records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        ids = [record["id"] for record in records]
        return ids, np.array([record["embedding"] for record in records], np.float32)
    table = pq.read_table(path)
    assert table.schema.field("embedding").type.list_size > 0  # a fixed-size list
    dims = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().values.to_numpy().reshape(-1, dims)
    return table.column("id").to_pylist(), vectors


def write_jsonl(path: Path, texts: list[str], **extra: list[Any]) -> Path:
    with path.open("wb") as handle:
        for i, text in enumerate(texts):
            record = {"text": text, **{key: values[i] for key, values in extra.items()}}
            handle.write(orjson.dumps(record) + b"\n")
    return path


# --- the pipeline, in process, with a fake model -----------------------------------------


@asynccontextmanager
async def fake_service(
    embedder: FakeEmbedder, calibration: Calibration | None = None
) -> AsyncIterator[EmbeddingService]:
    """The real service and batcher around a fake model, with no cache (so every vector a
    job writes was either computed by this run or taken from a committed part)."""
    registry = ModelRegistry()
    registry.add(ModelSpec(name="fake", source="memory"), embedder)
    batcher = MicroBatcher(embedder, BatchingSettings(max_wait_ms=1.0, max_queue_texts=1000))
    batcher.start()
    try:
        yield EmbeddingService(
            registry,
            {"fake": batcher},
            TieredCache(MemoryTier(0), None),
            CacheSettings(),
            {"fake": calibration} if calibration is not None else None,
        )
    finally:
        await batcher.stop()


async def run_fake(job: EmbedJob, embedder: FakeEmbedder | None = None) -> JobReport:
    async with fake_service(embedder or FakeEmbedder()) as service:
        return await run_embed_job(service, job, max_queue_texts=1000)


def computed(embedder: FakeEmbedder) -> list[str]:
    return [text for call in embedder.calls for text in call]


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[str]]:
    texts = [f"text {i} " + "word " * (i % 37) for i in range(2000)]
    return write_jsonl(tmp_path / "in.jsonl", texts, key=[f"k{i}" for i in range(2000)]), texts


def job_for(source: Path, output: Path, **options: Any) -> EmbedJob:
    fmt: OutputFormat = "jsonl" if output.suffix == ".jsonl" else "parquet"
    return EmbedJob(input=source, output=output, format=fmt, model="fake", **options)


async def test_a_failed_run_resumes_without_recomputing_committed_chunks(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, texts = dataset
    job = job_for(source, tmp_path / "out.parquet", id_field="key", chunk_size=100)
    with pytest.raises(ModelFailed):
        await run_fake(job, FakeEmbedder(fail_on=texts[1234]))
    parts = sorted(job.work_dir.glob("part-*.arrow"))
    assert parts and not job.output.exists()
    done_before = {int(part.stem.removeprefix("part-")) for part in parts}
    assert 12 not in done_before

    embedder = FakeEmbedder()
    report = await run_fake(job, embedder)
    recomputed = set(computed(embedder))
    for index in done_before:  # committed chunks were read from their parts, not recomputed
        assert not recomputed & set(texts[index * 100 : (index + 1) * 100])
    assert report.rows == 2000 and report.resumed == 100 * len(done_before)
    assert report.embedded == 2000 - report.resumed
    ids, vectors = read_output(job.output)
    assert ids == [f"k{i}" for i in range(2000)]
    np.testing.assert_allclose(vectors, np.stack([vector_for(text) for text in texts]))
    assert not list(job.work_dir.glob("part-*"))  # parts are gone once assembled


async def test_a_cancelled_run_resumes_and_a_finished_one_is_a_no_op(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, texts = dataset
    job = job_for(source, tmp_path / "out.jsonl", chunk_size=50)
    embedder = FakeEmbedder()
    async with fake_service(embedder) as service:
        committed = asyncio.Event()

        def note(update: ProgressUpdate) -> None:
            if update.rows >= 250:
                committed.set()

        task = asyncio.create_task(
            run_embed_job(service, job, max_queue_texts=1000, on_progress=note)
        )
        await committed.wait()
        task.cancel()  # what Ctrl-C does to asyncio.run
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not job.output.exists()
    report = await run_fake(job)
    assert report.resumed >= 250 and report.rows == 2000
    ids, vectors = read_output(job.output)
    assert ids == list(range(2000))
    np.testing.assert_allclose(vectors, np.stack([vector_for(text) for text in texts]))

    again = FakeEmbedder()
    report = await run_fake(job, again)
    assert report.already_complete and report.rows == 2000 and not again.calls
    assert "already complete" in report.summary()

    job.output.write_bytes(b"changed")  # an output touched since: embedded again
    assert not (await run_fake(job)).already_complete
    assert read_output(job.output)[0] == list(range(2000))


async def test_changed_input_or_options_start_over(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, texts = dataset
    job = job_for(source, tmp_path / "out.parquet", chunk_size=100)
    with pytest.raises(ModelFailed):
        await run_fake(job, FakeEmbedder(fail_on=texts[1500]))
    write_jsonl(source, [*texts, "one more"])  # new size and mtime
    report = await run_fake(job)
    assert report.resumed == 0 and report.rows == 2001
    assert read_output(job.output)[0] == list(range(2001))

    bigger_chunks = job_for(source, tmp_path / "out.parquet", chunk_size=300)
    report = await run_fake(bigger_chunks)
    assert not report.already_complete and report.rows == 2001


async def test_bad_rows_fail_with_their_number_or_are_skipped(tmp_path: Path) -> None:
    lines = [orjson.dumps({"text": f"t{i}"}) for i in range(300)]
    lines[123] = b'{"text": ""}'
    lines[250] = b"{broken"
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    fail = job_for(source, tmp_path / "fail.parquet", chunk_size=100)
    with pytest.raises(DatasetError, match=r"row 123: empty text.*--on-error skip"):
        await run_fake(fail)
    assert not fail.output.exists()

    skip = job_for(source, tmp_path / "skip.parquet", chunk_size=100, on_error="skip")
    report = await run_fake(skip)
    assert report.rows == 298 and report.skipped == 2
    assert read_output(skip.output)[0] == [i for i in range(300) if i not in (123, 250)]


async def test_chunks_larger_than_the_queue_and_an_empty_input(tmp_path: Path) -> None:
    texts = [f"text number {i}" for i in range(2500)]
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    report = await run_fake(job_for(source, tmp_path / "out.parquet", chunk_size=2500))
    assert report.rows == 2500  # embedded in slices the batcher's queue (1000) accepts

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    report = await run_fake(job_for(empty, tmp_path / "empty.parquet"))
    assert report.rows == 0
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
@pytest.mark.parametrize("embedding_type", ["int8", "ubinary", "float16"])
async def test_an_output_type_is_stored_natively_in_every_format(
    tmp_path: Path, suffix: str, embedding_type: str
) -> None:
    texts = [f"text {i}" for i in range(40)]
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    calibration = Calibration("fake", np.stack([vector_for(f"c{i}") for i in range(64)]))
    output = tmp_path / f"out{suffix}"
    fmt: OutputFormat = {".parquet": "parquet", ".npy": "npy", ".jsonl": "jsonl"}[suffix]  # type: ignore[assignment]
    job = EmbedJob(
        input=source,
        output=output,
        format=fmt,
        model="fake",
        chunk_size=16,
        embedding_type=embedding_type,  # type: ignore[arg-type]
    )
    async with fake_service(FakeEmbedder(), calibration) as service:
        await run_embed_job(service, job, max_queue_texts=1000)
    floats = np.stack([vector_for(text) for text in texts])
    want = quantize(floats, embedding_type, calibration)  # type: ignore[arg-type]
    if suffix == ".npy":
        got = np.load(output)
        assert got.dtype == want.dtype
    elif suffix == ".parquet":
        column = pq.read_table(output).column("embedding").combine_chunks()
        assert column.type.value_type == pa.from_numpy_dtype(want.dtype)
        got = column.values.to_numpy().reshape(len(texts), -1)
    else:
        records = [orjson.loads(line) for line in output.read_bytes().splitlines()]
        got = np.array([record["embedding"] for record in records], np.float32)
        got = got.astype(want.dtype)
    np.testing.assert_array_equal(got, want)


async def test_an_output_type_the_model_cannot_give_fails_before_any_work(
    tmp_path: Path,
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", ["a", "b"])
    job = EmbedJob(
        input=source, output=tmp_path / "o.npy", format="npy", model="fake", embedding_type="int8"
    )
    embedder = FakeEmbedder()
    with pytest.raises(InvalidInput, match="calibrated ranges"):
        await run_fake(job, embedder)
    assert embedder.calls == []


def test_default_output_name() -> None:
    assert default_output(Path("/d/corpus.jsonl.gz")) == Path("/d/corpus.embeddings.parquet")
    assert default_output(Path("data.v2.csv")) == Path("data.v2.embeddings.parquet")


# --- the CLI against the real model ------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "Redis is an in-memory data store.",
    "A longer passage about batching: " + "padding wastes compute on CPU. " * 12,
    "Ünïcödé, emoji ✓ and 中文 text.",
    "The quick brown fox jumps over the lazy dog.",  # a duplicate
    "short",
    "Parquet stores columns in row groups.",
    'A text, with a comma; and "quotes".',
    "Line one\r\nline two inside one CSV cell",
]


def embed_cli(
    tmp_path: Path, *args: str, data_dir: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "EMBEDPIPE_DATA_DIR": str(data_dir or tmp_path / "data"),
        "EMBEDPIPE_MODEL_THREADS": "1",
        "EMBEDPIPE_REDIS_URL": "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "embedpipe", "embed", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def cli_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the CLI tests of this module: the later runs see the earlier vectors."""
    return tmp_path_factory.mktemp("embed-cli-data")


def _csv_gz(path: Path, ids: list[str], texts: list[str]) -> Path:
    import csv
    import gzip
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["doc_id", "body", "ignored"])
    writer.writerows([doc_id, text, "x"] for doc_id, text in zip(ids, texts, strict=True))
    path.write_bytes(gzip.compress(buffer.getvalue().encode()))
    return path


@pytest.mark.model
@pytest.mark.parametrize(
    ("source", "output", "options", "want_ids"),
    [
        ("in.jsonl", "out.parquet", ["--id-field", "key"], [f"k{i}" for i in range(10)]),
        ("in.csv.gz", "out.jsonl", ["--text-field", "body", "--id-field", "doc_id"], None),
        ("in.parquet", "out.npy", ["--id-field", "n"], None),
        (
            "in.txt",
            "vectors.bin",
            ["--format", "parquet", "--chunk-size", "3", "--on-error", "skip"],
            [0, 1, 2, 3, 5, 6, 7, 8, 9],  # line 4 is blank: skipped
        ),
    ],
)
def test_each_input_format_row_by_row_against_the_reference_model(
    tmp_path: Path,
    cli_data_dir: Path,
    reference_model: Any,
    source: str,
    output: str,
    options: list[str],
    want_ids: list[Any] | None,
) -> None:
    texts = TEXTS
    path = tmp_path / source
    if source == "in.jsonl":
        write_jsonl(path, texts, key=[f"k{i}" for i in range(10)])
    elif source == "in.csv.gz":
        want_ids = [f"doc-{i}" for i in range(10)]
        _csv_gz(path, want_ids, texts)
    elif source == "in.parquet":
        pq.write_table(pa.table({"n": range(100, 110), "text": texts}), path)
        want_ids = [None] * 10  # .npy holds the vectors only, in input order
    else:
        texts = [text for text in TEXTS if "\n" not in text]  # one text a line
        path.write_text("\n".join([*texts[:4], "", *texts[4:]]) + "\n", encoding="utf-8")
    result = embed_cli(tmp_path, str(path), "-o", output, *options, data_dir=cli_data_dir)
    assert f"{len(texts)} rows -> {output}" in result.stderr
    if source == "in.txt":
        assert "skipped row 4: empty line" in result.stderr
        assert "skipped 1 bad or failed rows" in result.stderr
    ids, vectors = read_output(tmp_path / output)
    assert ids == want_ids
    assert_same_vectors(vectors, reference_vectors(reference_model, texts))


@pytest.fixture
def corpus() -> Iterator[list[str]]:
    from benchmarks.corpus import load_corpus

    base = load_corpus(500)
    # 2,000 distinct short texts: numbered paragraph openings of varied lengths.
    yield [f"{i}. {base[i % 500][: 40 + (i * 7) % 120]}" for i in range(2000)]


@pytest.mark.model
def test_sigkill_mid_run_then_rerun_writes_every_row_exactly_once_then_a_no_op_and_cache_hits(
    tmp_path: Path, corpus: list[str], reference_model: Any
) -> None:
    write_jsonl(tmp_path / "in.jsonl", corpus, key=[f"id-{i}" for i in range(len(corpus))])
    args = ["in.jsonl", "-o", "out.parquet", "--id-field", "key", "--chunk-size", "100"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "EMBEDPIPE_DATA_DIR": str(tmp_path / "data"),
        "EMBEDPIPE_MODEL_THREADS": "1",
        "EMBEDPIPE_REDIS_URL": "",
    }
    parts = tmp_path / "out.parquet.parts"
    process = subprocess.Popen(
        [sys.executable, "-m", "embedpipe", "embed", *args, "-q"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(parts.glob("part-*.arrow"))) < 4:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "no chunk was committed in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()
    committed = len(list(parts.glob("part-*.arrow")))
    assert 4 <= committed < 20 and not (tmp_path / "out.parquet").exists()

    result = embed_cli(tmp_path, *args)
    summary = result.stderr
    assert "2,000 rows -> out.parquet" in summary and "resumed: " in summary, summary
    resumed = int(summary.split("resumed: ")[1].split(" rows")[0].replace(",", ""))
    assert resumed >= committed * 100
    ids, vectors = read_output(tmp_path / "out.parquet")
    assert ids == [f"id-{i}" for i in range(2000)]  # every id once, in input order
    sample = list(range(0, 2000, 13))  # 154 rows, from before and after the kill
    assert_same_vectors(
        vectors[sample], reference_vectors(reference_model, [corpus[i] for i in sample])
    )
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["state"] == "complete" and manifest["result"]["rows"] == 2000

    assert "already complete" in embed_cli(tmp_path, *args, "-q").stderr
    # The same texts into another file: every vector comes from the cache.
    other = embed_cli(tmp_path, "in.jsonl", "-o", "again.jsonl", "--id-field", "key", "-q")
    assert "cache hits 100.0%" in other.stderr, other.stderr
    again_ids, again = read_output(tmp_path / "again.jsonl")
    assert again_ids == ids
    np.testing.assert_allclose(again, vectors, atol=1e-6)


@pytest.mark.model
def test_a_bad_row_fails_with_its_number_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"text": "  "}\n', encoding="utf-8")
    result = embed_cli(tmp_path, "in.jsonl", "-q", check=False)
    assert result.returncode == 1
    assert "row 1: empty text in field 'text'" in result.stderr
    assert "--on-error skip" in result.stderr


def test_usage_errors_need_no_model(tmp_path: Path) -> None:
    (tmp_path / "in.xml").write_text("<a/>", encoding="utf-8")
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    result = embed_cli(tmp_path, "in.xml", check=False)
    assert result.returncode == 1 and "cannot tell the format of in.xml" in result.stderr
    result = embed_cli(tmp_path, "in.jsonl", "-o", "out.csv", check=False)
    assert result.returncode == 1 and "--format" in result.stderr
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = embed_cli(tmp_path, "in.jsonl", "--server", nobody, check=False)
    assert result.returncode == 1 and f"cannot reach {nobody}" in result.stderr
    result = embed_cli(tmp_path, "in.jsonl", "--embedding-type", "int4", check=False)
    assert result.returncode == 2 and "int4" in result.stderr


@pytest.mark.model
@pytest.mark.server
def test_on_a_server_as_batches_killed_then_picked_up_row_by_row(
    tmp_path: Path, embedded_server: ServerProcess, reference_model: Any
) -> None:
    """``--server``: the file becomes Batch API jobs (3 segments of at most 50 rows); the CLI
    killed after submitting picks the same batches up instead of submitting again."""
    texts = [f"{TEXTS[i % len(TEXTS)]} (row {i})" for i in range(120)]
    keys = [f"doc-{i}" for i in range(120)]
    source = write_jsonl(tmp_path / f"remote-{uuid.uuid4().hex[:8]}.jsonl", texts, key=keys)
    with source.open("a", encoding="utf-8") as handle:
        handle.write('{"key": "no-text"}\n')  # a bad row, left out with --on-error skip
    args = [str(source), "-o", "out.parquet", "--id-field", "key", "--on-error", "skip"]
    args += ["--server", embedded_server.url, "--batch-rows", "50"]
    state_path = tmp_path / "out.parquet.remote.json"

    first = subprocess.Popen(
        [sys.executable, "-m", "embedpipe", "embed", *args, "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (state_path.exists() and json.loads(state_path.read_text())["batches"]):
        assert first.poll() is None or first.returncode == 0, "the first run failed"
        assert time.monotonic() < deadline, "no batch submitted"
        time.sleep(0.05)
    first.kill()
    first.wait()
    # As if it had been killed after the server created the batches but before the state
    # file recorded them: the next run must adopt them from the server, not submit again.
    state = json.loads(state_path.read_text())
    state["batches"] = []
    state_path.write_text(json.dumps(state))

    result = embed_cli(tmp_path, *args)
    assert "120 rows -> out.parquet" in result.stderr
    assert f"on {embedded_server.url}" in result.stderr
    assert "skipped 1 bad or failed rows" in result.stderr
    ids, vectors = read_output(tmp_path / "out.parquet")
    assert ids == keys
    assert_same_vectors(vectors, reference_vectors(reference_model, texts))

    batch_ids = json.loads(state_path.read_text())["batches"]
    assert len(batch_ids) == 3
    client = OpenAI(base_url=f"{embedded_server.url}/v1", api_key="unused", max_retries=0)
    with client:
        ours = [
            batch.id
            for batch in client.batches.list(limit=100)
            if batch.metadata and batch.metadata.get("embedpipe_input") == source.name
        ]
        assert sorted(ours) == sorted(batch_ids)  # nothing was submitted twice
        input_file = client.batches.retrieve(batch_ids[0]).input_file_id
        with pytest.raises(NotFoundError):
            client.files.retrieve(input_file)  # the CLI cleaned up after itself

    again = embed_cli(tmp_path, *args)
    assert "already complete" in again.stderr


@pytest.mark.model
@pytest.mark.server
def test_on_a_server_an_output_type_is_the_servers_bytes(
    tmp_path: Path, embedded_server: ServerProcess
) -> None:
    from embedpipe.datasets.remote import RemoteJob, run_remote_job

    texts = [f"{TEXTS[i % len(TEXTS)]} (typed row {i})" for i in range(12)]
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    output = tmp_path / "out.npy"
    job = RemoteJob(
        server=embedded_server.url,
        input=source,
        output=output,
        format="npy",
        embedding_type="int8",
        poll_seconds=0.2,
    )
    with OpenAI(base_url=f"{embedded_server.url}/v1", api_key="unused") as client:
        report = run_remote_job(client, job)
        online = client.embeddings.create(
            model="all-MiniLM-L6-v2",
            input=texts,
            encoding_format="float",
            extra_body={"embedding_type": "int8"},
        )
    assert report.rows == len(texts)
    stored = np.load(output)
    assert stored.dtype == np.int8 and stored.shape == (len(texts), 384)
    np.testing.assert_array_equal(stored, [item.embedding for item in online.data])
