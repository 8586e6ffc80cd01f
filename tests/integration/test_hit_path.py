"""The cache-hit path against real servers and the real ``openai`` SDK: floats and base64 carry
the same float32 values on a miss and on a hit, ``usage`` is the tokenizer's count on a hit
too, and float16 storage (``EMBEDPIPE_CACHE__STORE_DTYPE``) halves the stored entries."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI

from tests.integration.conftest import MODEL, assert_same_vectors, reference_vectors
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]


def _client(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _texts() -> list[str]:
    tag = uuid.uuid4().hex[:8]  # the session's server is shared: texts no other test sent
    return [
        f"{tag}: a sentence about caches and vectors.",
        f"{tag}: " + "a long paragraph that runs past the window " * 40,
        f"{tag}: short",
    ]


async def _embed_all_ways(server: ServerProcess, texts: list[str]) -> list[Any]:
    """base64 (the SDK asks for it and decodes it when no format is given) then float, twice:
    a miss, then hits."""
    async with _client(server) as client:
        responses = []
        for _ in range(2):
            responses.append(await client.embeddings.create(model=MODEL, input=texts))
            responses.append(
                await client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
            )
        return responses


async def test_floats_and_base64_are_bit_identical_on_miss_and_hit_and_usage_holds(
    embedded_server: ServerProcess, reference_model: Any
) -> None:
    texts = _texts()
    computed_before = embedded_server.metric("embedpipe_batch_size_sum", model=MODEL)
    responses = await _embed_all_ways(embedded_server, texts)
    # One computation; the three later responses were cache hits.
    assert embedded_server.metric("embedpipe_batch_size_sum", model=MODEL) == pytest.approx(
        computed_before + len(texts)
    )
    matrices = [
        np.asarray([item.embedding for item in response.data], dtype=np.float32)
        for response in responses
    ]
    for matrix in matrices[1:]:
        np.testing.assert_array_equal(matrix, matrices[0])
    assert_same_vectors(matrices[0], reference_vectors(reference_model, texts))
    tokens = reference_model.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    want = sum(len(ids) for ids in tokens)
    assert {response.usage.prompt_tokens for response in responses} == {want}
    assert {response.usage.total_tokens for response in responses} == {want}


@pytest.fixture(scope="module")
def float16_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, Path]]:
    """A server storing float16, and its data dir."""
    data = tmp_path_factory.mktemp("float16") / "data"
    server = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(data),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_CACHE__STORE_DTYPE": "float16",
        },
        data.parent / "server.log",
    )
    server.start()
    yield server, data
    server.stop()


async def test_float16_storage_halves_entries_and_answers_the_same_on_miss_and_hit(
    float16_server: tuple[ServerProcess, Path], reference_model: Any
) -> None:
    server, data = float16_server
    texts = _texts()
    responses = await _embed_all_ways(server, texts)
    matrices = [
        np.asarray([item.embedding for item in response.data], dtype=np.float32)
        for response in responses
    ]
    for matrix in matrices[1:]:
        np.testing.assert_array_equal(matrix, matrices[0])
    assert_same_vectors(matrices[0], reference_vectors(reference_model, texts), min_cosine=0.9999)
    # Even the computed answer carries float16 values, as every later hit will.
    np.testing.assert_array_equal(matrices[0].astype(np.float16).astype(np.float32), matrices[0])
    with sqlite3.connect(data / "cache.sqlite3") as connection:
        sizes = {length for (length,) in connection.execute("SELECT length(value) FROM cache")}
    # 384 float16 values, packed in L2 to 31 bits per 32 (cache/packing.py): half of float32's.
    assert sizes == {745}
