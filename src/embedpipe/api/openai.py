"""OpenAI-compatible routes: ``POST /v1/embeddings`` and the model list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedpipe.api.deps import body_schema, get_runtime, json_body, json_response
from embedpipe.api.embedding_steps import embed_request
from embedpipe.api.schemas import EmbeddingResponse, ErrorBody, ModelList
from embedpipe.api.security import admit_request
from embedpipe.embedders.registry import ROUTES_OF_TASK
from embedpipe.inputs import max_json_values
from embedpipe.operations.openai_embeddings import EmbeddingRequest, respond
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
    prepared, result, limit_headers = await embed_request(request, runtime, admission, body)
    return json_response(respond(prepared, result), headers=limit_headers)


_CAPABILITIES = {"embed": ["embeddings", "rerank"], "rerank": ["rerank"]}


def _model_objects(runtime: Runtime) -> list[dict[str, object]]:
    created = int(runtime.started_at)
    return [
        {
            "id": embedder.info.name,
            "object": "model",
            "created": created,
            "owned_by": "embedpipe",
            "capabilities": _CAPABILITIES[embedder.info.task],
            "endpoints": list(ROUTES_OF_TASK[embedder.info.task]),
        }
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
