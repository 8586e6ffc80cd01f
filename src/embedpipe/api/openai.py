"""OpenAI-compatible routes: ``POST /v1/embeddings`` and the model list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedpipe.api.deps import get_runtime, json_response, unless_disconnected
from embedpipe.api.schemas import EmbeddingRequest, EmbeddingResponse, ErrorBody, ModelList
from embedpipe.api.security import admit
from embedpipe.inputs import normalize_input
from embedpipe.runtime import Runtime
from embedpipe.vectors import check_dimensions, to_base64, truncate

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 413, 429, 503)
}


@router.post("/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
async def create_embeddings(
    body: EmbeddingRequest,
    request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
) -> Response:
    """Embed one text or many, as OpenAI's embeddings API does."""
    service = runtime.service
    model = service.resolve_model(body.model)
    dimensions = check_dimensions(body.dimensions, service.models.get(model).info.dimensions)
    texts = normalize_input(body.input, runtime.settings.limits, runtime.token_decoder)
    # Counted once: the token budget is charged what `usage` reports, before any work.
    tokens = await service.count_tokens(model, texts)
    limit_headers = await admit(request, runtime, sum(tokens), param="input")
    result = await unless_disconnected(request, service.embed(model, texts, tokens))
    vectors = truncate(result.vectors, dimensions)
    if body.encoding_format == "base64":
        data = [
            {"object": "embedding", "index": index, "embedding": to_base64(vector)}
            for index, vector in enumerate(vectors)
        ]
    else:
        data = [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(vectors)
        ]
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": result.model,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        },
        headers=limit_headers,
    )


def _model_objects(runtime: Runtime) -> list[dict[str, object]]:
    created = int(runtime.started_at)
    return [
        {"id": embedder.info.name, "object": "model", "created": created, "owned_by": "embedpipe"}
        for embedder in runtime.service.models
    ]


@router.get("/models", response_model=ModelList)
async def list_models(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    """The models this server serves."""
    return json_response({"object": "list", "data": _model_objects(runtime)})


@router.get("/models/{model:path}", responses={404: {"model": ErrorBody}})
async def retrieve_model(model: str, runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    """One served model (aliases resolve to their model)."""
    name = runtime.service.resolve_model(model)
    return json_response(next(obj for obj in _model_objects(runtime) if obj["id"] == name))
