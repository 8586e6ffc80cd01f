"""The ONNX Runtime backend against the torch reference: the real bundled weights, exported
once for this module under a temporary data dir, fp32 and int8, in process and in a server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedpipe.embedders import Embedder, load_embedder, parse_model_specs
from embedpipe.settings import Settings
from tests.integration.conftest import MODEL, assert_same_vectors, reference_vectors
from tests.server_process import ServerProcess

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
# The lowest cosine of an int8 vector to torch's on TEXTS was 0.977 here (the empty text;
# on the 512-text bench corpus: 0.982 min, 0.993 mean). The margin is for int8 kernels that round
# differently on other CPUs (VNNI or not).
INT8_MIN_COSINE = 0.97


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
    assert_same_vectors(got, want, min_cosine=INT8_MIN_COSINE)
    # Really quantised: not the fp32 graph again.
    assert float(np.abs(got - fp32.embed(TEXTS)).max()) > 1e-3
    assert int8.info.backend == "onnx-int8"
    assert int8.count_tokens(TEXTS) == fp32.count_tokens(TEXTS)


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
def onnx_server(
    fp32: Embedder, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server on EMBEDPIPE_BACKEND=onnx over this module's data dir (the export is there)."""
    root = tmp_path_factory.mktemp("onnx-server")
    server = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(data_dir),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_BACKEND": "onnx",
            "EMBEDPIPE_LOG_FORMAT": "text",
        },
        root / "server.log",
    )
    # Its first start calibrates the ONNX model's int8 ranges (no shipped record for this
    # backend's fingerprint): 256 texts through the model, a minute or more on 2 shared cores.
    server.start(timeout=480)
    yield server
    server.stop()


@pytest.mark.server
def test_a_server_on_the_onnx_backend_answers_embeddings(
    onnx_server: ServerProcess, reference_model: Any, data_dir: Path
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
    assert "reusing the ONNX export" in onnx_server.logs()
