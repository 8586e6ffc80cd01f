"""Fixtures shared by the fuzzing and security tests: one real server with API keys on, and
the Hypothesis settings of every fuzzer here.

``make test`` runs each fuzzer with a small, fixed set of examples (derandomized: the same
inputs every run, so a red CI is a real, reproducible failure). A soak run multiplies the
examples and draws new ones each time::

    EMBEDPIPE_FUZZ_SCALE=20 pytest tests/reliability -m reliability
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from embedpipe.operations.openai_embeddings import EmbeddingRequest, create_embeddings
from embedpipe.settings import Settings
from tests.cross_encoder import CROSS_ENCODER
from tests.fakes import fake_app
from tests.server_process import ServerProcess

# One embeddings request body in, the response body out: what a BatchProcessor calls.
Embed = Callable[[EmbeddingRequest], Awaitable[dict[str, Any]]]

FUZZ_SCALE = max(1, int(os.environ.get("EMBEDPIPE_FUZZ_SCALE", "1")))

# Distinctive on purpose: the log test greps the server's log for it.
API_KEY = "ep-reliability-Zq9vX3kLm7Tt2Rw8"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Uploads past this answer 413 (kept small so the test that proves it stays cheap).
MAX_FILE_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="session")
def keyed_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir of ``keyed_server`` (its parent holds the server's log)."""
    return tmp_path_factory.mktemp("keyed") / "data"


@pytest.fixture(scope="session")
def keyed_server(keyed_data_dir: Path, cross_encoder_dir: Path) -> Iterator[ServerProcess]:
    """The embedded default with an API key and the test cross-encoder, logging at debug
    level (so the log test sees everything the server would ever write)."""
    server = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(keyed_data_dir),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_API_KEYS": API_KEY,
            "EMBEDPIPE_LOG_LEVEL": "debug",
            "EMBEDPIPE_JOBS__MAX_FILE_BYTES": str(MAX_FILE_BYTES),
            "EMBEDPIPE_EXTRA_MODELS": f"{CROSS_ENCODER}=cross-encoder:{cross_encoder_dir}",
        },
        keyed_data_dir.parent / "server.log",
    )
    server.start()
    yield server
    server.stop()


def fuzz_settings(examples: int) -> settings:
    """``examples`` per test (times ``EMBEDPIPE_FUZZ_SCALE``), no deadline (a shared 2-core
    machine is slow now and then), and no example database left in the working tree."""
    return settings(
        max_examples=examples * FUZZ_SCALE,
        deadline=None,
        database=None,
        derandomize=FUZZ_SCALE == 1,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture
async def embed(tmp_path: Path) -> AsyncIterator[Embed]:
    """The real embeddings operation (validation included) over the fake model."""
    settings = Settings(data_dir=tmp_path / "data")
    _, runtime = fake_app(settings)

    async def answer(request: EmbeddingRequest) -> dict[str, Any]:
        return await create_embeddings(
            runtime.service, runtime.token_decoder, settings.limits, request
        )

    yield answer
    await runtime.close()
