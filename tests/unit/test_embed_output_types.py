"""``embedding_type`` on ``/v1/embeddings``, the simple API and batch lines, and Cohere's
``POST /v2/embed``: the real application over a fake model with a fixed calibration."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedpipe.operations.cohere_embed import CohereEmbedRequest, truncation_fields
from embedpipe.quantization import Calibration, quantize
from embedpipe.settings import Settings
from tests.fakes import fake_app, vector_for

TEXTS = ["alpha", "beta", "alpha"]
CALIBRATION = Calibration("fake", np.stack([vector_for(f"calibration {i}") for i in range(64)]))


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app, runtime = fake_app(Settings(data_dir=tmp_path / "data"), calibration=CALIBRATION)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000"
    ) as client:
        yield client
    await runtime.close()


def _expected(texts: list[str], embedding_type: str, dimensions: int = 8) -> list[list[float]]:
    vectors = np.stack([vector_for(text) for text in texts])[:, :dimensions]
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    rows: list[list[float]] = quantize(vectors, embedding_type, CALIBRATION).tolist()  # type: ignore[arg-type]
    return rows


async def test_v2_embed_answers_every_asked_type_in_cohere_shape(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post(
        "/v2/embed",
        json={
            "model": "fake",
            "texts": TEXTS,
            "input_type": "search_document",
            "embedding_types": ["float", "int8", "uint8", "binary", "ubinary", "base64"],
        },
        headers={"x-request-id": "req-7"},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["id"] == "req-7"
    assert body["response_type"] == "embeddings_by_type"
    assert body["texts"] == TEXTS
    assert body["meta"]["billed_units"]["input_tokens"] == 9  # the fake's 3 tokens per text
    embeddings = body["embeddings"]
    assert set(embeddings) == {"float", "int8", "uint8", "binary", "ubinary", "base64"}
    np.testing.assert_allclose(embeddings["float"], _expected(TEXTS, "float32"), rtol=1e-6)
    for name in ("int8", "uint8", "binary", "ubinary"):
        assert embeddings[name] == _expected(TEXTS, name), name
    assert len(embeddings["binary"][0]) == 1  # 8 dimensions, one byte
    decoded = [np.frombuffer(base64.b64decode(row), "<f4") for row in embeddings["base64"]]
    np.testing.assert_array_equal(decoded, np.asarray(embeddings["float"], np.float32))


async def test_v2_embed_reads_inputs_of_text_parts_and_cuts_to_output_dimension(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post(
        "/v2/embed",
        json={
            "model": "fake",
            "inputs": [{"content": [{"type": "text", "text": "alpha"}]}],
            "input_type": "search_query",
            "embedding_types": ["int8"],
            "output_dimension": 4,
        },
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["embeddings"]["int8"] == _expected(["alpha"], "int8", 4)


async def test_v1_embeddings_applies_embedding_type_after_dimensions(
    client: httpx.AsyncClient,
) -> None:
    for embedding_type in ("int8", "uint8", "binary", "ubinary", "float16"):
        reply = await client.post(
            "/v1/embeddings",
            json={"model": "fake", "input": TEXTS, "embedding_type": embedding_type},
        )
        assert reply.status_code == 200, reply.text
        got = [item["embedding"] for item in reply.json()["data"]]
        if embedding_type == "float16":
            # Written as float32 numbers: read as float32, they are the float16 values.
            half = np.asarray(got, np.float32).astype(np.float16)
            np.testing.assert_array_equal(half, np.asarray(_expected(TEXTS, "float16"), np.float16))
        else:
            assert got == _expected(TEXTS, embedding_type)
    reply = await client.post(
        "/v1/embeddings",
        json={
            "model": "fake",
            "input": TEXTS,
            "embedding_type": "int8",
            "dimensions": 5,
            "encoding_format": "base64",
        },
    )
    assert reply.status_code == 200, reply.text
    raw = [
        np.frombuffer(base64.b64decode(item["embedding"]), np.int8) for item in reply.json()["data"]
    ]
    assert [row.tolist() for row in raw] == _expected(TEXTS, "int8", 5)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"input": "hi", "embedding_type": "int4"}, "embedding_type"),
        (
            "/v1/embeddings",
            {"input": "hi", "embedding_type": "binary", "dimensions": 4},
            "dimensions",
        ),
        ("/v1/embeddings", {"input": "hi", "dimensions": 9}, "dimensions"),
    ],
)
async def test_bad_output_types_on_v1_name_their_field(
    client: httpx.AsyncClient, path: str, body: dict[str, object], param: str
) -> None:
    reply = await client.post(path, json={"model": "fake", **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"texts": []}, "texts"),
        ({"texts": [""]}, "texts"),
        ({"texts": ["hi"], "embedding_types": ["int4"]}, "embedding_types"),
        ({"texts": ["hi"], "embedding_types": []}, "embedding_types"),
        ({"texts": ["hi"], "output_dimension": 9}, "output_dimension"),
        ({"texts": ["hi"], "output_dimension": 0}, "output_dimension"),
        ({"texts": ["hi"], "output_dimension": 4, "embedding_types": ["binary"]}, "multiple of 8"),
        ({"texts": ["hi"], "truncate": "MIDDLE"}, "truncate"),
        ({"texts": ["hi"], "inputs": []}, "texts"),
        ({}, "texts"),
        ({"texts": ["hi"], "images": ["data:image/png;base64,AAAA"]}, "Images"),
        ({"inputs": [{"content": [{"type": "image_url", "image_url": "x"}]}]}, "inputs"),
    ],
)
async def test_bad_cohere_input_is_a_400_in_cohere_shape(
    client: httpx.AsyncClient, body: dict[str, object], word: str
) -> None:
    reply = await client.post("/v2/embed", json={"model": "fake", **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()
    assert set(error) == {"id", "message"}
    assert word in error["message"]


async def test_an_unknown_model_is_a_404_in_cohere_shape(client: httpx.AsyncClient) -> None:
    reply = await client.post("/v2/embed", json={"model": "nope", "texts": ["hi"]})
    assert reply.status_code == 404
    assert "nope" in reply.json()["message"]


@pytest.mark.parametrize(
    ("truncate", "fields"),
    [
        ("END", {"truncate": True, "truncation_direction": "right"}),
        ("START", {"truncate": True, "truncation_direction": "left"}),
        ("NONE", {"truncate": False}),
    ],
)
def test_cohere_truncate_maps_onto_truncate_and_its_direction(
    truncate: str, fields: dict[str, object]
) -> None:
    body = CohereEmbedRequest.model_validate({"model": "m", "texts": ["x"], "truncate": truncate})
    assert truncation_fields(body.truncate) == fields
    # Absent or null (LangChain sends null): END, Cohere's default.
    assert truncation_fields(CohereEmbedRequest(model="m", texts=["x"]).truncate) == {
        "truncate": True,
        "truncation_direction": "right",
    }


async def test_the_simple_api_serves_every_embedding_type(client: httpx.AsyncClient) -> None:
    for embedding_type in ("int8", "ubinary", "float32"):
        one = await client.post("/embed", json={"text": "alpha", "embedding_type": embedding_type})
        assert one.status_code == 200, one.text
        many = await client.post(
            "/embed/batch", json={"texts": TEXTS, "embedding_type": embedding_type}
        )
        assert many.status_code == 200, many.text
        expected = _expected(TEXTS, "float32" if embedding_type == "float32" else embedding_type)
        if embedding_type == "float32":
            np.testing.assert_allclose(many.json()["embeddings"], expected, rtol=1e-6)
        else:
            assert many.json()["embeddings"] == expected
            assert one.json()["embedding"] == expected[0]
    reply = await client.post("/embed", json={"text": "alpha", "embedding_type": "int4"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "embedding_type"


async def test_a_batch_line_gets_its_embedding_type_or_a_400_on_it(tmp_path: Path) -> None:
    from embedpipe.batches.store_sqlite import SqliteJobStore
    from embedpipe.batches.wiring import new_processor

    settings = Settings(data_dir=tmp_path / "data")
    _, runtime = fake_app(settings, calibration=CALIBRATION)
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    try:
        processor = new_processor(settings, runtime, store)
        body = {"model": "fake", "input": TEXTS, "embedding_type": "uint8"}
        line = await processor._answer("batch_1", {"custom_id": "a", "body": body})
        assert line["response"]["status_code"] == 200
        rows = [item["embedding"] for item in line["response"]["body"]["data"]]
        assert [row.tolist() for row in rows] == _expected(TEXTS, "uint8")
        bad = {**body, "embedding_type": "int4"}
        line = await processor._answer("batch_1", {"custom_id": "b", "body": bad})
        assert line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["param"] == "embedding_type"
    finally:
        await store.close()
        await runtime.close()


def _outputs(embedding_type: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"model": "fake", "type": embedding_type}
    return REGISTRY.get_sample_value("embedpipe_embedding_outputs_total", labels) or 0.0


async def test_vectors_served_are_counted_by_output_type(client: httpx.AsyncClient) -> None:
    from embedpipe import metrics
    from embedpipe.quantization import EMBEDDING_TYPES

    assert metrics.OUTPUT_TYPES == EMBEDDING_TYPES
    before = {name: _outputs(name) for name in ("float32", "int8", "binary")}
    await client.post(
        "/v1/embeddings", json={"model": "fake", "input": TEXTS, "embedding_type": "int8"}
    )
    await client.post(
        "/v2/embed",
        json={"model": "fake", "texts": ["x"], "embedding_types": ["float", "base64", "binary"]},
    )
    after = {name: _outputs(name) - before[name] for name in before}
    assert after == {"float32": 2.0, "int8": 3.0, "binary": 1.0}


async def test_v1_embed_without_types_answers_cohere_v1s_float_shape(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post("/v1/embed", json={"model": "fake", "texts": TEXTS})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["response_type"] == "embeddings_floats"
    np.testing.assert_allclose(body["embeddings"], _expected(TEXTS, "float32"), rtol=1e-6)
    typed = await client.post(
        "/v1/embed", json={"model": "fake", "texts": TEXTS, "embedding_types": ["ubinary"]}
    )
    assert typed.json()["response_type"] == "embeddings_by_type"
    assert typed.json()["embeddings"]["ubinary"] == _expected(TEXTS, "ubinary")
