"""Cohere-compatible embeddings: ``POST /v2/embed`` (errors in Cohere's shape come from
``cohere_errors.py``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedpipe.api.deps import body_schema, get_runtime, json_body, json_response
from embedpipe.api.embedding_steps import embed_request
from embedpipe.api.schemas import CohereEmbedResponse, CohereErrorBody
from embedpipe.api.security import admit_request
from embedpipe.inputs import max_json_values
from embedpipe.operations.cohere_embed import (
    CohereEmbedRequest,
    embedding_request,
    respond_by_type,
    texts_of,
)
from embedpipe.runtime import Runtime

router = APIRouter(tags=["Cohere-compatible"])

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": CohereErrorBody} for status in (400, 401, 404, 413, 429, 503)
}


@router.post(
    "/v2/embed",
    response_model=CohereEmbedResponse,
    responses=_ERRORS,
    openapi_extra=body_schema(CohereEmbedRequest),
)
async def embed_v2(request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    """Embed texts as Cohere's embed v2 does, in one or several types at once."""
    return await _embed(request, runtime, floats_unless_typed=False)


@router.post(
    "/v1/embed",
    responses=_ERRORS,
    openapi_extra=body_schema(CohereEmbedRequest),
)
async def embed_v1(request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
    """Cohere's embed v1 (what LangChain's ``CohereEmbeddings`` calls): v2's answer, or
    without ``embedding_types`` one float list per text (``embeddings_floats``)."""
    return await _embed(request, runtime, floats_unless_typed=True)


async def _embed(request: Request, runtime: Runtime, *, floats_unless_typed: bool) -> Response:
    admission = await admit_request(request, runtime)
    limits = runtime.settings.limits
    body = await json_body(
        request, CohereEmbedRequest, max_values=max_json_values(limits), param="texts"
    )
    texts = texts_of(body, limits)
    openai_body = embedding_request(body, texts, runtime.service)
    prepared, result, limit_headers = await embed_request(
        request, runtime, admission, openai_body, param="texts"
    )
    response_id = str(getattr(request.state, "request_id", ""))
    answer = respond_by_type(
        body, texts, prepared, result, response_id, floats_unless_typed=floats_unless_typed
    )
    return json_response(answer, headers=limit_headers)
