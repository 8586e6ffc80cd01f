"""OpenAI-compatible routes: ``POST /v1/embeddings`` and the model list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedpipe.api.deps import (
    body_schema,
    get_runtime,
    json_body,
    json_response,
    off_loop_if_big,
    unless_disconnected,
)
from embedpipe.api.schemas import EmbeddingResponse, ErrorBody, ModelList
from embedpipe.api.security import admit_request, charge_tokens
from embedpipe.inputs import max_json_values
from embedpipe.operations.openai_embeddings import (
    EmbeddingRequest,
    embed_inputs,
    prepare,
    prepare_inputs,
    respond,
)
from embedpipe.runtime import Runtime

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 413, 429, 503)
}


@router.post(
    "/embeddings",
    response_model=EmbeddingResponse,
    responses=_ERRORS,
    openapi_extra=body_schema(EmbeddingRequest),
)
async def create_embeddings(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """Embed one text or many, as OpenAI's embeddings API does."""
    # The request's slot first: a client over its budget costs no parsing or tokenizing.
    admission = await admit_request(request, runtime)
    limits = runtime.settings.limits
    body = await json_body(request, EmbeddingRequest, max_values=max_json_values(limits))
    service = runtime.service
    prepared = await off_loop_if_big(request, prepare, service, runtime.token_decoder, limits, body)
    # Cut at the window (or into windows) before anything tokenizes a whole long text, then
    # counted once: the token budget is charged what `usage` reports, before any model work.
    inputs = await prepare_inputs(service, limits, prepared)
    limit_headers = await charge_tokens(admission, runtime, inputs.total_tokens, param="input")
    # From L1 without a task; only work that may wait is watched for a client going away.
    result = service.embed_from_memory(
        prepared.model,
        inputs.texts,
        inputs.tokens,
        dimensions=prepared.dimensions,
        form=inputs.form,
    )
    if result is None:
        result = await unless_disconnected(request, embed_inputs(service, prepared, inputs))
    else:
        result = inputs.combine(result)
    return json_response(respond(prepared, result), headers=limit_headers)


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
