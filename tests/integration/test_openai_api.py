"""The OpenAI-compatible API against a real server process, with real clients."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI
from pydantic import SecretStr

from tests.integration.conftest import MODEL, assert_same_vectors, reference_vectors
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings turn text into vectors for search and retrieval.",
    "short",
    "Ein deutscher Satz mit Umlauten: äöü ß.",
    "A much longer passage " * 20,
]


def _client(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


async def test_openai_sdk_defaults_base64_and_matches_the_reference(
    embedded_server: ServerProcess, reference_model: Any
) -> None:
    async with _client(embedded_server) as client:
        response = await client.embeddings.create(model=MODEL, input=TEXTS)
    assert response.model == MODEL
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    assert_same_vectors(
        [item.embedding for item in response.data], reference_vectors(reference_model, TEXTS)
    )
    tokens = [
        len(ids)
        for ids in reference_model.tokenizer(TEXTS, truncation=True, max_length=256)["input_ids"]
    ]
    assert response.usage.prompt_tokens == sum(tokens) == response.usage.total_tokens


async def test_float_format_alias_and_single_string(
    embedded_server: ServerProcess, reference_model: Any
) -> None:
    async with httpx.AsyncClient(base_url=embedded_server.url) as http:
        reply = await http.post(
            "/v1/embeddings",
            json={
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "input": TEXTS[0],
                "encoding_format": "float",
            },
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["data"][0]["object"] == "embedding"
    assert_same_vectors(
        [body["data"][0]["embedding"]], reference_vectors(reference_model, TEXTS[:1])
    )


async def test_base64_round_trip_is_bit_exact_with_float(embedded_server: ServerProcess) -> None:
    import base64

    async with httpx.AsyncClient(base_url=embedded_server.url) as http:
        as_float, as_b64 = await asyncio.gather(
            http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[:2]}),
            http.post(
                "/v1/embeddings",
                json={"model": MODEL, "input": TEXTS[:2], "encoding_format": "base64"},
            ),
        )
    for plain, packed in zip(as_float.json()["data"], as_b64.json()["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(packed["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(plain["embedding"], dtype=np.float32))


async def test_dimensions_is_the_renormalised_prefix(embedded_server: ServerProcess) -> None:
    async with _client(embedded_server) as client:
        full = await client.embeddings.create(model=MODEL, input=TEXTS[1])
        short = await client.embeddings.create(model=MODEL, input=TEXTS[1], dimensions=64)
    vector = np.asarray(short.data[0].embedding)
    assert vector.shape == (64,)
    prefix = np.asarray(full.data[0].embedding)[:64]
    np.testing.assert_allclose(vector, prefix / np.linalg.norm(prefix), atol=1e-6)


async def test_long_text_is_truncated_by_tokens_and_served(
    embedded_server: ServerProcess, reference_model: Any
) -> None:
    text = "tokens are counted, not characters. " * 400
    async with _client(embedded_server) as client:
        response = await client.embeddings.create(model=MODEL, input=text)
    assert response.usage.prompt_tokens == 256
    assert_same_vectors([response.data[0].embedding], reference_vectors(reference_model, [text]))


async def test_token_id_input_decodes_to_the_same_vectors(embedded_server: ServerProcess) -> None:
    import tiktoken  # noqa: F401  # the SDK's own tokenizer package is present with langchain

    from embedpipe.inputs import TokenDecoder

    ids = [TokenDecoder()._encoding.encode(text) for text in TEXTS[:3]]
    async with _client(embedded_server) as client:
        from_text = await client.embeddings.create(model=MODEL, input=TEXTS[:3])
        from_ids = await client.embeddings.create(model=MODEL, input=ids)
    for left, right in zip(from_text.data, from_ids.data, strict=True):
        np.testing.assert_array_equal(left.embedding, right.embedding)


async def test_langchain_openai_embeddings_with_default_settings(
    embedded_server: ServerProcess,
    reference_model: Any,
    tiktoken_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from langchain_openai import OpenAIEmbeddings

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    embeddings = OpenAIEmbeddings(  # type: ignore[call-arg]
        model=MODEL, base_url=f"{embedded_server.url}/v1", api_key=SecretStr("unused")
    )
    try:
        documents = await embeddings.aembed_documents(TEXTS)
        query = await embeddings.aembed_query("What does the fox do?")
    finally:
        # LangChain never closes the clients it builds; unclosed sockets would warn later.
        # (``client``/``async_client`` are the SDK's embeddings resources; ``_client`` its root.)
        await embeddings.async_client._client.close()
        embeddings.client._client.close()
    assert_same_vectors(documents, reference_vectors(reference_model, TEXTS))
    assert_same_vectors([query], reference_vectors(reference_model, ["What does the fox do?"]))


async def test_models_are_listed_and_retrievable_by_alias(embedded_server: ServerProcess) -> None:
    async with _client(embedded_server) as client:
        listed = await client.models.list()
        model = await client.models.retrieve("sentence-transformers/all-MiniLM-L6-v2")
    assert [item.id for item in listed.data] == [MODEL]
    assert model.id == MODEL


def test_curl_and_the_simple_api(embedded_server: ServerProcess, reference_model: Any) -> None:
    text = "curl is how operators try a service first"
    reply = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            f"{embedded_server.url}/embed",
            "-H",
            "Content-Type: application/json",
            "-d",
            f'{{"text": "{text}"}}',
        ],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    )
    import json

    first = json.loads(reply.stdout)
    assert first["cached"] is False and first["model"] == MODEL
    assert_same_vectors([first["embedding"]], reference_vectors(reference_model, [text]))
    again = httpx.post(f"{embedded_server.url}/embed", json={"text": text}).json()
    assert again["cached"] is True
    assert again["embedding"] == first["embedding"]
    batch = httpx.post(
        f"{embedded_server.url}/embed/batch", json={"texts": [text, "a new one", text]}
    ).json()
    assert batch["count"] == 3
    assert batch["cached_count"] == 2
    assert batch["embeddings"][0] == batch["embeddings"][2] == first["embedding"]


async def test_concurrent_misses_for_one_text_are_computed_once(
    embedded_server: ServerProcess,
) -> None:
    before = embedded_server.metric("embedpipe_batch_size_sum", model=MODEL)
    text = "single flight: many clients ask for the same new text at once"
    async with httpx.AsyncClient(base_url=embedded_server.url) as http:
        replies = await asyncio.gather(
            *(http.post("/embed", json={"text": text}) for _ in range(16))
        )
    vectors = {tuple(reply.json()["embedding"]) for reply in replies}
    assert len(vectors) == 1
    assert embedded_server.metric("embedpipe_batch_size_sum", model=MODEL) - before == 1


def test_ops_routes(embedded_server: ServerProcess) -> None:
    with httpx.Client(base_url=embedded_server.url) as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        stats = http.get("/stats").json()
        assert stats["mode"] == "embedded"
        assert stats["models"][0]["name"] == MODEL
        assert stats["models"][0]["weights_sha256"].startswith("53aa51172d14")
        assert set(stats["cache"]) == {"l1", "l2"}
        assert http.get("/docs").status_code == 200
        paths = http.get("/openapi.json").json()["paths"]
        assert {"/v1/embeddings", "/embed", "/embed/batch"} <= set(paths)
        metrics = http.get("/metrics")
        assert "embedpipe_embeddings_total" in metrics.text
        assert metrics.headers["x-request-id"]
