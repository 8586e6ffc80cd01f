"""OpenAI's embeddings operation without HTTP: a request body in, a response body out.

The ``/v1/embeddings`` route and batch jobs both answer through this function, so a batch
line gets exactly what the same request would get online.
"""

from __future__ import annotations

from typing import Any

from embedpipe.api.schemas import EmbeddingRequest
from embedpipe.inputs import TokenDecoder, normalize_input
from embedpipe.service import EmbeddingService
from embedpipe.settings import LimitsSettings
from embedpipe.vectors import check_dimensions, to_base64, truncate


async def create_embeddings(
    service: EmbeddingService,
    decoder: TokenDecoder,
    limits: LimitsSettings,
    request: EmbeddingRequest,
) -> dict[str, Any]:
    """The response body (vectors as float32 arrays: serialise with orjson's numpy option)."""
    model = service.resolve_model(request.model)
    dimensions = check_dimensions(request.dimensions, service.models.get(model).info.dimensions)
    texts = normalize_input(request.input, limits, decoder)
    result = await service.embed(model, texts)
    vectors = truncate(result.vectors, dimensions)
    encode = to_base64 if request.encoding_format == "base64" else _as_is
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode(vector)}
            for index, vector in enumerate(vectors)
        ],
        "model": result.model,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
    }


def _as_is(vector: Any) -> Any:
    return vector
