"""Output types and Cohere's embed API against a real server process, with the official
``cohere`` SDK and LangChain's ``CohereEmbeddings`` unmodified, checked against the reference
library (``SentenceTransformer.encode`` + ``quantize_embeddings`` with the model's ranges)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import pytest

from embedpipe.quantization import load_calibration
from embedpipe.quantization.calibration import calibrate, calibration_texts
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
INTEGER_TYPES = ("int8", "uint8", "binary", "ubinary")


@pytest.fixture(scope="module")
def bundled_embedder(bundled_model_dir: Path) -> Any:
    from embedpipe.embedders.registry import BUNDLED_MODEL, BUNDLED_SHA256
    from embedpipe.embedders.sentence_transformers import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        BUNDLED_MODEL, bundled_model_dir, expected_sha256=BUNDLED_SHA256
    )


@pytest.fixture(scope="module")
def ranges(bundled_embedder: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The bundled model's calibration, as the server loads it."""
    data_dir = tmp_path_factory.mktemp("calibration")
    calibration = load_calibration(bundled_embedder, data_dir)
    assert not (data_dir / "calibration").exists()  # shipped: nothing computed at load
    return calibration.ranges


def _quantized(vectors: np.ndarray, precision: str, ranges: Any) -> np.ndarray:
    from sentence_transformers import quantize_embeddings

    result = quantize_embeddings(vectors, precision=precision, ranges=ranges(vectors.shape[1]))  # type: ignore[arg-type]
    assert isinstance(result, np.ndarray)
    return result


def test_the_shipped_record_is_this_models_vectors_of_the_corpus(bundled_embedder: Any) -> None:
    shipped = load_calibration(bundled_embedder, Path("/nonexistent-data-dir"))
    # The first batch of the recipe (the whole corpus takes a minute or more here).
    fresh = calibrate(bundled_embedder, limit=16).astype(np.float32)
    np.testing.assert_allclose(shipped.vectors[:16], fresh, atol=1e-3)
    assert shipped.vectors.shape == (len(calibration_texts()), 384)


async def test_int8_and_binary_are_quantize_embeddings_of_the_served_vectors(
    embedded_server: ServerProcess, reference_model: Any, ranges: Any
) -> None:
    async with httpx.AsyncClient(base_url=embedded_server.url, timeout=60) as http:

        async def embed(embedding_type: str, **extra: Any) -> list[Any]:
            reply = await http.post(
                "/v1/embeddings",
                json={"model": MODEL, "input": TEXTS, "embedding_type": embedding_type, **extra},
            )
            assert reply.status_code == 200, reply.text
            return [item["embedding"] for item in reply.json()["data"]]

        served = np.asarray(await embed("float32"), np.float32)
        assert_same_vectors(served, reference_vectors(reference_model, TEXTS))
        reference = reference_vectors(reference_model, TEXTS)
        for precision in INTEGER_TYPES:
            got = np.asarray(await embed(precision))
            # Byte for byte the library's answer for the vectors served...
            np.testing.assert_array_equal(got, _quantized(served, precision, ranges))
            # ...and within one bucket (or a sign bit at ~0) of the reference encode's.
            want = _quantized(reference, precision, ranges).astype(np.int16)
            if precision.endswith("int8"):
                assert np.abs(got.astype(np.int16) - want).max() <= 1
            else:
                bits = np.unpackbits(got.astype(np.uint8), axis=1) != np.unpackbits(
                    want.astype(np.uint8), axis=1
                )
                assert (np.abs(reference[bits]) < 1e-4).all()
        # base64: the raw bytes of the type; after `dimensions` (cut, renormalised, then cut
        # into that size's buckets).
        b64 = await embed("int8", encoding_format="base64", dimensions=128)
        raw = np.stack([np.frombuffer(base64.b64decode(row), np.int8) for row in b64])
        cut = served[:, :128] / np.linalg.norm(served[:, :128], axis=1, keepdims=True)
        np.testing.assert_array_equal(raw, _quantized(cut, "int8", ranges))
        half = await embed("float16", encoding_format="base64")
        decoded = np.stack([np.frombuffer(base64.b64decode(row), "<f2") for row in half])
        np.testing.assert_array_equal(decoded, served.astype(np.float16))


@pytest.fixture
def cohere_client(embedded_server: ServerProcess) -> Iterator[cohere.ClientV2]:
    with cohere.ClientV2(api_key="unused", base_url=embedded_server.url) as client:
        yield client


def test_cohere_sdk_embeds_several_types_at_once(
    cohere_client: cohere.ClientV2, reference_model: Any, ranges: Any
) -> None:
    response = cohere_client.embed(
        model=MODEL,
        texts=TEXTS,
        input_type="search_document",
        embedding_types=["float", "int8", "uint8", "binary", "ubinary", "base64"],
    )
    assert response.response_type == "embeddings_by_type"
    assert response.texts == TEXTS
    assert response.meta is not None and response.meta.billed_units is not None
    tokens = reference_model.tokenizer(TEXTS, truncation=True, max_length=256)["input_ids"]
    assert response.meta.billed_units.input_tokens == sum(map(len, tokens))
    embeddings = response.embeddings
    assert embeddings.float_ is not None and embeddings.base64 is not None
    served = np.asarray(embeddings.float_, np.float32)
    assert_same_vectors(served, reference_vectors(reference_model, TEXTS))
    for precision in INTEGER_TYPES:
        got = np.asarray(getattr(embeddings, precision))
        np.testing.assert_array_equal(got, _quantized(served, precision, ranges))
    decoded = np.stack([np.frombuffer(base64.b64decode(row), "<f4") for row in embeddings.base64])
    np.testing.assert_array_equal(decoded, served)

    cut = cohere_client.embed(
        model=MODEL,
        inputs=[cohere.EmbedInput(content=[cohere.TextEmbedContent(text=TEXTS[0])])],
        input_type="search_query",
        embedding_types=["float"],
        output_dimension=64,
        truncate="START",
    )
    assert cut.embeddings.float_ is not None
    assert len(cut.embeddings.float_[0]) == 64


def test_cohere_sdk_raises_its_typed_errors_for_bad_input(cohere_client: cohere.ClientV2) -> None:
    bad: list[dict[str, Any]] = [
        {"texts": []},
        {"texts": ["hi"], "embedding_types": ["int4"]},
        {"texts": ["hi"], "output_dimension": 1000},
        {"texts": ["hi"], "output_dimension": 12, "embedding_types": ["binary"]},
    ]
    for arguments in bad:
        with pytest.raises(cohere.BadRequestError) as error:
            cohere_client.embed(model=MODEL, input_type="search_document", **arguments)
        assert set(error.value.body) == {"id", "message"}, arguments
    with pytest.raises(cohere.NotFoundError):
        cohere_client.embed(model="embed-v9", texts=["hi"], input_type="search_document")


# cohere 5.21.1's v1 client merges its batched answers through pydantic's deprecated
# ``parse_obj`` and instance ``model_fields``: the vendor's warnings, not ours.
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")
def test_langchain_cohere_embeddings_unmodified(
    embedded_server: ServerProcess, reference_model: Any
) -> None:
    from langchain_cohere import CohereEmbeddings

    embeddings = CohereEmbeddings(  # type: ignore[call-arg]  # client: built by its validator
        model=MODEL, base_url=embedded_server.url, cohere_api_key="unused", max_retries=1
    )
    with embeddings.client:  # closes its connections at the end
        documents = embeddings.embed_documents(TEXTS)
        query = embeddings.embed_query(TEXTS[1])
    assert_same_vectors(documents, reference_vectors(reference_model, TEXTS))
    assert_same_vectors([query], reference_vectors(reference_model, TEXTS[1:2]))
