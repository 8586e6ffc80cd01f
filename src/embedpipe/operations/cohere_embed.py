"""Cohere's embed v2 (``POST /v2/embed``, and v1's ``POST /v1/embed``, which LangChain's
``CohereEmbeddings`` calls) without HTTP: its request read into an OpenAI ``EmbeddingRequest``
(answered by the same steps as ``/v1/embeddings``), and the answer written in Cohere's
``embeddings_by_type`` shape, one list per asked type (v1 without ``embedding_types``: its
``embeddings_floats`` shape).

Cohere's names map onto ours: ``texts`` (or ``inputs`` of text parts) → ``input``,
``output_dimension`` → ``dimensions``, ``truncate`` ``END`` (its default) / ``START`` / ``NONE``
→ ``truncate`` true + ``truncation_direction`` right / true + left / false, ``input_type`` as
given (the model's prompts), and ``embedding_types`` ``float`` / ``base64`` (float32 numbers /
bytes), ``int8``, ``uint8``, ``binary``, ``ubinary`` → ``embedding_type``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from embedpipe.errors import InvalidInput
from embedpipe.inputs import check_sizes, check_text
from embedpipe.operations.openai_embeddings import EmbeddingRequest, PreparedRequest, output_vectors
from embedpipe.quantization import EmbeddingType, check_output_type, json_ready, to_base64_of_type
from embedpipe.service import EmbeddingService, EmbedResult
from embedpipe.settings import LimitsSettings
from embedpipe.vectors import check_dimensions

CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
CohereInputType = Literal["search_document", "search_query", "classification", "clustering"]
Truncate = Literal["NONE", "START", "END"]

# Cohere's type -> (our output type, base64 or not).
_OUTPUT: dict[str, tuple[EmbeddingType, bool]] = {
    "float": ("float32", False),
    "base64": ("float32", True),
    "int8": ("int8", False),
    "uint8": ("uint8", False),
    "binary": ("binary", False),
    "ubinary": ("ubinary", False),
}
_TRUNCATION: dict[Truncate, dict[str, Any]] = {
    "END": {"truncate": True, "truncation_direction": "right"},
    "START": {"truncate": True, "truncation_direction": "left"},
    "NONE": {"truncate": False},
}


class TextContent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class CohereInput(BaseModel):
    """One of Cohere's ``inputs``: its text parts are embedded together (images are not
    served here)."""

    content: list[TextContent] = Field(min_length=1)


class CohereEmbedRequest(BaseModel):
    """Cohere's embed v2 request (fields this server does not use, such as ``priority`` or
    ``max_tokens``, are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(examples=["all-MiniLM-L6-v2"])
    texts: list[str] | None = Field(None, examples=[["hello", "world"]])
    inputs: list[CohereInput] | None = None
    images: list[str] | None = None
    input_type: CohereInputType | None = Field(None, examples=["search_document"])
    # None (or absent): float.
    embedding_types: list[CohereEmbeddingType] | None = Field(None, examples=[["float", "int8"]])
    # None (or absent): END, Cohere's default.
    truncate: Truncate | None = None
    output_dimension: int | None = Field(None, strict=True)

    @property
    def output_types(self) -> list[CohereEmbeddingType]:
        """The asked types, each once, in order."""
        return list(dict.fromkeys(self.embedding_types or ["float"]))


def texts_of(body: CohereEmbedRequest, limits: LimitsSettings) -> list[str]:
    """The texts to embed, from ``texts`` or ``inputs``; InvalidInput for none, both, images or
    an empty text."""
    if body.images:
        raise InvalidInput("Images are not served here: send 'texts'.", param="images")
    if (body.texts is None) == (body.inputs is None):
        raise InvalidInput("Send exactly one of 'texts' and 'inputs'.", param="texts")
    param = "texts" if body.texts is not None else "inputs"
    if body.texts is not None:
        texts = body.texts
    else:
        texts = ["\n".join(part.text for part in item.content) for item in body.inputs or []]
    if not texts:
        raise InvalidInput(f"'{param}' must not be an empty list.", param=param)
    check_sizes(texts, limits, param=param)
    for index, text in enumerate(texts):
        check_text(text, index, limits, param=param)
    return texts


def embedding_request(
    body: CohereEmbedRequest, texts: list[str], service: EmbeddingService
) -> EmbeddingRequest:
    """The OpenAI request that answers ``body``, after Cohere's own fields are checked (so a
    400 names Cohere's field: ``output_dimension``, ``embedding_types``)."""
    model = service.resolve_model(body.model)
    model_dimensions = service.models.get(model).info.dimensions
    dimensions = check_dimensions(body.output_dimension, model_dimensions, param="output_dimension")
    if body.embedding_types == []:
        raise InvalidInput("'embedding_types' must not be an empty list.", param="embedding_types")
    for name in body.output_types:
        check_output_type(
            _OUTPUT[name][0],
            dimensions or model_dimensions,
            service.calibration(model),
            param="embedding_types",
            dimensions_param="output_dimension" if dimensions else None,
        )
    return EmbeddingRequest(
        model=body.model,
        input=texts,
        input_type=body.input_type,
        dimensions=body.output_dimension,
        **truncation_fields(body.truncate),
    )


def truncation_fields(truncate: Truncate | None) -> dict[str, Any]:
    """``EmbeddingRequest``'s fields for Cohere's ``truncate`` (None: END, its default)."""
    return dict(_TRUNCATION[truncate or "END"])


def respond_by_type(
    body: CohereEmbedRequest,
    texts: list[str],
    prepared: PreparedRequest,
    result: EmbedResult,
    response_id: str,
    *,
    floats_unless_typed: bool = False,
) -> dict[str, Any]:
    """Cohere's ``embeddings_by_type`` response: one list of vectors per asked type.
    ``floats_unless_typed`` (v1): without ``embedding_types``, the ``embeddings_floats``
    shape, one float list per text."""
    meta = {"api_version": {"version": "2"}, "billed_units": {"input_tokens": result.tokens}}
    if floats_unless_typed and body.embedding_types is None:
        vectors = output_vectors(prepared, result, "float32")
        return {
            "id": response_id,
            "embeddings": vectors,
            "texts": texts,
            "meta": {**meta, "api_version": {"version": "1"}},
            "response_type": "embeddings_floats",
        }
    embeddings: dict[str, list[Any]] = {}
    for name in body.output_types:
        embedding_type, as_base64 = _OUTPUT[name]
        vectors = output_vectors(prepared, result, embedding_type)
        if as_base64:
            embeddings[name] = [to_base64_of_type(row, embedding_type) for row in vectors]
        else:
            embeddings[name] = [json_ready(row) for row in vectors]
    return {
        "id": response_id,
        "embeddings": embeddings,
        "texts": texts,
        "meta": meta,
        "response_type": "embeddings_by_type",
    }
