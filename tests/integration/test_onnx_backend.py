"""The ONNX Runtime backend against the torch reference: the real bundled weights, exported
once for this module under a temporary data dir, fp32 and int8, in process and in a server.
The server, ``embed`` and ``models`` run as processes in which torch, transformers and
sentence-transformers cannot be imported (tests/torch_free.py): with the export present, the
ONNX backend needs none of them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from embedpipe.embedders import Embedder, load_embedder, parse_model_specs
from embedpipe.embedders.onnx_int8 import INT8_GATE, INT8_RECIPE, Int8Recipe, quantize_int8
from embedpipe.errors import ModelLoadError
from embedpipe.settings import Settings
from tests.conftest import require_redis_server
from tests.integration.batch_helpers import (
    read_lines,
    request_line,
    submit,
    texts_for,
    vectors_by_custom_id,
    wait_for,
)
from tests.integration.conftest import MODEL, assert_same_vectors, reference_vectors
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess
from tests.torch_free import forbidden_imports, torch_free_env
from tests.worker_process import WorkerProcess

pytestmark = [pytest.mark.model]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings turn text into vectors for search and retrieval.",
    "short",
    "",
    "Ein deutscher Satz mit Umlauten: äöü ß. 日本語の文もあります。",
    "def add(a: int, b: int) -> int:\n    return a + b  # code is text too",
    "A much longer passage that runs past the model's window of tokens. " * 40,
    "word " * 400,
]


def _settings(data_dir: Path, quantize: str = "none", backend: str = "onnx") -> Settings:
    return Settings(data_dir=data_dir, backend=backend, onnx_quantize=quantize, model_threads=2)


def _load(settings: Settings) -> Embedder:
    spec = parse_model_specs(settings.model, "", settings.backend)[0]
    return load_embedder(spec, settings)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-data")


@pytest.fixture(scope="module")
def fp32(data_dir: Path) -> Embedder:
    return _load(_settings(data_dir))  # exports the model (the slow part of this module)


@pytest.fixture(scope="module")
def int8(fp32: Embedder, data_dir: Path) -> Embedder:
    return _load(_settings(data_dir, "int8"))  # quantises fp32's export


def _export_dirs(data_dir: Path) -> list[Path]:
    return sorted(path for path in (data_dir / "onnx").iterdir() if not path.name.startswith("."))


def test_fp32_vectors_match_torch_including_truncated_texts(
    fp32: Embedder, reference_model: Any
) -> None:
    want = reference_vectors(reference_model, TEXTS)
    got = fp32.embed(TEXTS)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert_same_vectors(got, want, min_cosine=0.9999)
    # Not bit-identical, but as close as torch is to itself: 2.4e-7 here, while one text
    # alone vs in a padded batch differs by 2.2e-7 in torch.
    assert float(np.abs(got - want).max()) < 1e-5
    assert fp32.info.backend == "onnx"
    assert fp32.info.max_tokens == 256 and fp32.info.dimensions == 384


def test_token_counts_match_torch(fp32: Embedder, reference_model: Any) -> None:
    want = [
        len(ids)
        for ids in reference_model.tokenizer(TEXTS, truncation=True, max_length=256)["input_ids"]
    ]
    assert fp32.count_tokens(TEXTS) == want
    assert max(want) == 256  # the long texts really were cut at the window


def test_a_vector_does_not_depend_on_its_batch_companions(fp32: Embedder) -> None:
    batched = fp32.embed(TEXTS)  # padded to the longest (256 tokens)
    alone = np.concatenate([fp32.embed([text]) for text in TEXTS])
    assert_same_vectors(alone, batched, min_cosine=0.99999)
    assert fp32.embed([]).shape == (0, 384)


def test_int8_is_close_to_torch_but_its_own_variant(
    int8: Embedder, fp32: Embedder, reference_model: Any
) -> None:
    want = reference_vectors(reference_model, TEXTS)
    got = int8.embed(TEXTS)
    # The gate's cosine holds on these texts too (it was measured on others at export).
    assert_same_vectors(got, want, min_cosine=INT8_GATE.min_cosine)
    # Really quantised: not the fp32 graph again.
    assert float(np.abs(got - fp32.embed(TEXTS)).max()) > 1e-3
    assert int8.info.backend == "onnx-int8"
    assert int8.count_tokens(TEXTS) == fp32.count_tokens(TEXTS)


def test_the_int8_export_records_its_recipe_and_fidelity_above_the_gate(
    int8: Embedder, data_dir: Path
) -> None:
    (export,) = [path for path in _export_dirs(data_dir) if path.name.endswith("-int8")]
    metadata = json.loads((export / "export.json").read_text())
    fidelity = metadata["fidelity"]
    assert fidelity["against"] == "onnx-fp32" and fidelity["texts"] > 200
    assert fidelity["min_cosine"] >= INT8_GATE.min_cosine
    assert fidelity["top10"] >= INT8_GATE.top10
    recipe = metadata["int8_recipe"]
    assert {**recipe, "calibration": None} == {**INT8_RECIPE.record(), "calibration": None}
    assert len(recipe["calibration"]) == 16  # which texts calibrated it
    # Smaller than fp32: its weights really are 8-bit.
    fp32_size = (export.parent / export.name.replace("-int8", "-fp32") / "model.onnx").stat()
    assert (export / "model.onnx").stat().st_size < fp32_size.st_size
    # The smoothed fp32 graph it was quantised from is gone (an image would carry it).
    assert sorted(path.name for path in export.iterdir()) == ["export.json", "model.onnx"]


def test_an_int8_recipe_below_the_gate_is_refused_with_its_figures(
    int8: Embedder, data_dir: Path, bundled_model_dir: Path, tmp_path: Path
) -> None:
    (fp32_export,) = [path for path in _export_dirs(data_dir) if path.name.endswith("-fp32")]
    coarse = Int8Recipe("dynamic, per tensor", per_channel=False, embeddings=True)
    with pytest.raises(ModelLoadError) as refused:
        quantize_int8(bundled_model_dir, fp32_export, tmp_path, recipe=coarse)
    message = refused.value.message
    assert "below its fidelity gate" in message and "min cosine 0." in message
    assert "top-10 neighbours 0." in message, message


def test_each_backend_and_variant_caches_under_its_own_fingerprint(
    fp32: Embedder, int8: Embedder, data_dir: Path
) -> None:
    torch_model = _load(_settings(data_dir, backend="torch"))
    fingerprints = {torch_model.fingerprint, fp32.fingerprint, int8.fingerprint}
    assert len(fingerprints) == 3
    # Stable across restarts: the cache entries stay valid.
    assert _load(_settings(data_dir, "int8")).fingerprint == int8.fingerprint


def test_a_second_load_reuses_the_export(
    fp32: Embedder, int8: Embedder, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exports = _export_dirs(data_dir)
    assert [path.name.rsplit("-", 1)[1] for path in exports] == ["fp32", "int8"]
    before = {path: (path / "model.onnx").stat().st_mtime_ns for path in exports}
    with caplog.at_level(logging.INFO, logger="embedpipe.model"):
        again = _load(_settings(data_dir))
    assert "reusing the ONNX export" in caplog.text
    assert "exporting" not in caplog.text
    assert {path: (path / "model.onnx").stat().st_mtime_ns for path in exports} == before
    assert again.fingerprint == fp32.fingerprint


@pytest.fixture(scope="module")
def guard_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this module's guarded processes log any import of torch and its kin."""
    return tmp_path_factory.mktemp("import-guard") / "forbidden-imports.log"


@pytest.fixture(scope="module")
def onnx_server(
    fp32: Embedder, data_dir: Path, guard_log: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server on EMBEDPIPE_BACKEND=onnx over this module's data dir (the export is there),
    in a process where torch, transformers and sentence-transformers cannot be imported."""
    root = tmp_path_factory.mktemp("onnx-server")
    server = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(data_dir),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_BACKEND": "onnx",
            "EMBEDPIPE_LOG_FORMAT": "text",
            **torch_free_env(guard_log),
        },
        root / "server.log",
    )
    # Its first start calibrates the ONNX model's int8 ranges (no shipped record for this
    # backend's fingerprint): 256 texts through the model, a minute or more on 2 shared cores.
    server.start(timeout=480)
    yield server
    server.stop()


@pytest.mark.server
def test_a_server_on_the_onnx_backend_answers_embeddings_without_torch(
    onnx_server: ServerProcess, guard_log: Path, reference_model: Any, data_dir: Path
) -> None:
    texts = [text for text in TEXTS if text]  # the API refuses empty inputs
    reply = httpx.post(
        f"{onnx_server.url}/v1/embeddings",
        json={"model": MODEL, "input": texts, "encoding_format": "float"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == MODEL
    assert_same_vectors(
        [item["embedding"] for item in body["data"]], reference_vectors(reference_model, texts)
    )
    stats = httpx.get(f"{onnx_server.url}/stats", timeout=10).json()
    assert [model["backend"] for model in stats["models"]] == ["onnx"]
    # Its int8 ranges: calibrated at its first start, recorded under its own fingerprint.
    assert len(list((data_dir / "calibration").glob("*.npy"))) == 1
    int8 = httpx.post(
        f"{onnx_server.url}/v1/embeddings",
        json={"model": MODEL, "input": texts, "embedding_type": "int8"},
        timeout=60,
    )
    assert int8.status_code == 200, int8.text
    logs = onnx_server.logs()
    assert "reusing the ONNX export" in logs
    # Empty because nothing asked, not because the guard was absent: the same environment
    # does log torch in test_without_an_export_and_without_torch_the_error_says_how_to_make_one.
    assert forbidden_imports(guard_log) == "", forbidden_imports(guard_log)


def _guarded_cli(
    data_dir: Path, guard_log: Path, *args: str, settings: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **(settings or {}),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "EMBEDPIPE_DATA_DIR": str(data_dir),
        "EMBEDPIPE_REDIS_URL": "",
        "EMBEDPIPE_BACKEND": "onnx",
        "EMBEDPIPE_MODEL_THREADS": "1",
        **torch_free_env(guard_log),
    }
    return subprocess.run(
        [sys.executable, "-m", "embedpipe", *args],
        env=env,
        cwd=data_dir.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_embed_runs_on_the_export_without_torch(
    fp32: Embedder, data_dir: Path, guard_log: Path, tmp_path: Path, reference_model: Any
) -> None:
    texts = [text for text in TEXTS if text]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    output = tmp_path / "out.jsonl"
    done = _guarded_cli(data_dir, guard_log, "embed", str(source), "-o", str(output), "-q")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert_same_vectors(
        [row["embedding"] for row in rows], reference_vectors(reference_model, texts)
    )
    assert forbidden_imports(guard_log) == "", forbidden_imports(guard_log)


def test_without_an_export_and_without_torch_the_error_says_how_to_make_one(
    guard_log: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    done = _guarded_cli(empty, tmp_path / "own.log", "models")
    assert done.returncode != 0
    assert "no ONNX export" in done.stderr and "embedpipe models" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # The guard did refuse torch there: the export needs it.
    assert "imported torch" in forbidden_imports(tmp_path / "own.log")


@pytest.mark.redis
@pytest.mark.server
def test_a_celery_worker_runs_batches_on_the_export_without_torch(
    fp32: Embedder, data_dir: Path, guard_log: Path, tmp_path: Path, reference_model: Any
) -> None:
    """The Batch API with its chunks on a Celery worker: API and worker both on the onnx
    backend, both unable to import torch."""
    require_redis_server()
    with RedisServer.start_new(tmp_path / "redis") as redis:
        env = {
            "EMBEDPIPE_REDIS_URL": redis.url,
            "EMBEDPIPE_BACKEND": "onnx",
            "EMBEDPIPE_ONNX_EXPORT_DIR": str(data_dir / "onnx"),
            "EMBEDPIPE_DATA_DIR": str(tmp_path / "shared"),
            "EMBEDPIPE_JOBS__QUEUE": f"embedpipe-onnx-{uuid.uuid4().hex[:8]}",
            "EMBEDPIPE_JOBS__CHUNK_SIZE": "10",
            **torch_free_env(guard_log),
        }
        with ServerProcess(env, tmp_path / "api.log") as api:
            api.start()
            worker = WorkerProcess(env, tmp_path / "worker.log", f"onnx@{tmp_path.name}").start()
            client = OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
            try:
                texts = texts_for(30, "onnx-worker")
                lines = [request_line(key, text) for key, text in texts.items()]
                done = wait_for(client, submit(client, lines).id, ("completed",), timeout=180)
                vectors = vectors_by_custom_id(read_lines(client, done.output_file_id))
            finally:
                client.close()
                worker.stop()
    assert set(vectors) == set(texts)
    assert_same_vectors(
        [vectors[key] for key in texts], reference_vectors(reference_model, list(texts.values()))
    )
    assert "run_chunk" in worker.logs() and "succeeded" in worker.logs()
    assert forbidden_imports(guard_log) == "", forbidden_imports(guard_log)


def test_models_makes_the_int8_ranges_beside_the_exports_and_a_torch_free_process_uses_them(
    fp32: Embedder, data_dir: Path, tmp_path: Path
) -> None:
    """As the slim image is built: `embedpipe models` where torch is (the exports exist: it
    only loads them) writes the model's int8 ranges beside them; then a process without torch
    serves int8 from that record, computing and writing nothing."""
    exports = tmp_path / "onnx"
    shutil.copytree(data_dir / "onnx", exports, ignore=shutil.ignore_patterns(".*"))
    settings = {"EMBEDPIPE_ONNX_EXPORT_DIR": str(exports)}
    build_data = tmp_path / "build-data"
    build_data.mkdir()
    made = _guarded_cli(build_data, tmp_path / "unused.log", "models", settings=settings)
    assert made.returncode == 0, made.stderr
    (record,) = (exports / "calibration").glob("*.npy")
    assert record.stat().st_mode & 0o777 == 0o644  # readable by another user (the image's)
    assert not (build_data / "calibration").exists()

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS if t))
    output, guard_log, fresh = tmp_path / "out.jsonl", tmp_path / "guard.log", tmp_path / "data"
    fresh.mkdir()
    args = ("embed", str(source), "-o", str(output), "-q", "--embedding-type", "int8")
    done = _guarded_cli(fresh, guard_log, *args, settings=settings)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line)["embedding"] for line in output.read_text().splitlines()]
    assert all(len(row) == 384 and all(-128 <= v <= 127 for v in row) for row in rows)
    assert "calibrating" not in done.stderr and not (fresh / "calibration").exists()
    assert forbidden_imports(guard_log) == "", forbidden_imports(guard_log)
