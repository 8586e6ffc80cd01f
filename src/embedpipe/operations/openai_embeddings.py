"""OpenAI's embeddings operation without HTTP: a request body in, a response body out.

The ``/v1/embeddings`` route and batch jobs both answer through these functions, so a batch
line gets exactly what the same request would get online. The route runs the steps itself
(``prepare``, then its own token charge, then ``respond``); batches call ``create_embeddings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from embedpipe.inputs import TokenDecoder, normalize_input
from embedpipe.service import EmbeddingService, EmbedResult
from embedpipe.settings import LimitsSettings
from embedpipe.vectors import check_dimensions, to_base64, truncate


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request."""

    model_config = ConfigDict(extra="ignore")

    input: Any = Field(
        description="A string, a list of strings, a list of cl100k_base token ids, or a list "
        "of token-id lists.",
        examples=["The food was delicious and the waiter..."],
    )
    model: str = Field(examples=["all-MiniLM-L6-v2"])
    encoding_format: Literal["float", "base64"] = "float"
    # Strict: a JSON true or "8" is a client's mistake, not the size 1 or 8.
    dimensions: int | None = Field(
        None,
        strict=True,
        description="Return the first N dimensions, renormalised to unit length.",
    )
    user: str | None = None


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    model: str
    texts: list[str]
    dimensions: int | None
    encoding_format: str


def prepare(
    service: EmbeddingService,
    decoder: TokenDecoder,
    limits: LimitsSettings,
    request: EmbeddingRequest,
) -> PreparedRequest:
    """Validate the request: the served model, ``dimensions`` and the texts (InvalidInput or
    ModelNotFound otherwise)."""
    model = service.resolve_model(request.model, route="/v1/embeddings")
    dimensions = check_dimensions(request.dimensions, service.models.get(model).info.dimensions)
    texts = normalize_input(request.input, limits, decoder)
    return PreparedRequest(model, texts, dimensions, request.encoding_format)


def respond(prepared: PreparedRequest, result: EmbedResult) -> dict[str, Any]:
    """The response body (float vectors stay float32 arrays: serialise with orjson's numpy
    option)."""
    vectors = truncate(result.vectors, prepared.dimensions)
    encode = to_base64 if prepared.encoding_format == "base64" else _as_is
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode(vector)}
            for index, vector in enumerate(vectors)
        ],
        "model": result.model,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
    }


async def create_embeddings(
    service: EmbeddingService,
    decoder: TokenDecoder,
    limits: LimitsSettings,
    request: EmbeddingRequest,
) -> dict[str, Any]:
    prepared = prepare(service, decoder, limits, request)
    result = await service.embed(prepared.model, prepared.texts, dimensions=prepared.dimensions)
    return respond(prepared, result)


def _as_is(vector: Any) -> Any:
    return vector
