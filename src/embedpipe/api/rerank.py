"""Rerank routes: ``POST /v1/rerank`` and ``/v2/rerank`` (Cohere's v2 and Jina's shape) and
``POST /rerank`` (TEI's). The logic is ``operations/rerank.py``."""

from __future__ import annotations

from functools import partial
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
from embedpipe.api.schemas import ErrorBody, RerankResponse, TeiRerankItem
from embedpipe.api.security import Admission, admit_request, charge_tokens
from embedpipe.inputs import max_json_values
from embedpipe.operations.rerank import (
    PreparedRerank,
    Ranked,
    RerankRequest,
    TeiRerankRequest,
    cohere_body,
    prepare,
    rank,
    tei_body,
)
from embedpipe.runtime import Runtime

router = APIRouter(tags=["Rerank"])

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 413, 429, 503)
}


async def _ranked(
    request: Request, runtime: Runtime, prepared: PreparedRerank, admission: Admission, *, raw: bool
) -> tuple[Ranked, dict[str, str]]:
    """Cut at the window, count, charge the pairs' (or texts') tokens, then score."""
    service = runtime.service
    inputs = await service.clip(prepared.model, prepared.inputs)
    tokens = await service.count_tokens(prepared.model, inputs)
    limit_headers = await charge_tokens(admission, runtime, sum(tokens), param="documents")
    result = service.embed_from_memory(prepared.model, inputs, tokens)
    if result is None:
        result = await unless_disconnected(request, service.embed(prepared.model, inputs, tokens))
    return rank(service, prepared, result, raw=raw), limit_headers


async def _cohere_rerank(request: Request, runtime: Runtime, route: str) -> Response:
    admission = await admit_request(request, runtime)
    limits = runtime.settings.limits
    body = await json_body(
        request, RerankRequest, max_values=max_json_values(limits), param="documents"
    )
    prepared = await off_loop_if_big(
        request,
        partial(
            prepare,
            runtime.service,
            limits,
            model=body.model,
            route=route,
            query=body.query,
            documents=body.documents,
            top_n=body.top_n,
            max_tokens_per_doc=body.max_tokens_per_doc,
        ),
    )
    ranked, headers = await _ranked(request, runtime, prepared, admission, raw=False)
    answer = cohere_body(prepared, ranked, return_documents=body.return_documents)
    return json_response(answer, headers=headers)


@router.post(
    "/v1/rerank",
    response_model=RerankResponse,
    responses=_ERRORS,
    openapi_extra=body_schema(RerankRequest),
)
async def rerank_v1(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """Rank documents by relevance to a query (Cohere's and Jina's rerank)."""
    return await _cohere_rerank(request, runtime, "/v1/rerank")


@router.post(
    "/v2/rerank",
    response_model=RerankResponse,
    responses=_ERRORS,
    openapi_extra=body_schema(RerankRequest),
)
async def rerank_v2(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """Rank documents by relevance to a query (Cohere's rerank v2)."""
    return await _cohere_rerank(request, runtime, "/v2/rerank")


@router.post(
    "/rerank",
    response_model=list[TeiRerankItem],
    responses=_ERRORS,
    openapi_extra=body_schema(TeiRerankRequest),
)
async def rerank_tei(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """Rank texts by relevance to a query (Text Embeddings Inference's rerank)."""
    admission = await admit_request(request, runtime)
    limits = runtime.settings.limits
    body = await json_body(
        request, TeiRerankRequest, max_values=max_json_values(limits), param="texts"
    )
    prepared = prepare(
        runtime.service,
        limits,
        model=body.model or runtime.default_reranker,
        route="/rerank",
        query=body.query,
        documents=body.texts,
        documents_param="texts",
    )
    ranked, headers = await _ranked(request, runtime, prepared, admission, raw=body.raw_scores)
    return json_response(tei_body(prepared, ranked, return_text=body.return_text), headers=headers)
