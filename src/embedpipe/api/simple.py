"""The simple API: ``POST /embed`` and ``POST /embed/batch``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from embedpipe.api.deps import (
    body_schema,
    get_runtime,
    json_body,
    json_response,
)
from embedpipe.api.embedding_steps import embed_charged
from embedpipe.api.schemas import (
    EmbedBatchRequest,
    EmbedBatchResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorBody,
)
from embedpipe.api.security import Admission, admit_request
from embedpipe.embedders.prompts import InputType
from embedpipe.errors import InvalidInput
from embedpipe.inputs import check_sizes, check_text, max_json_values
from embedpipe.operations.model_inputs import InputOptions, model_inputs
from embedpipe.operations.simple_embed import output_shape
from embedpipe.runtime import Runtime
from embedpipe.service import EmbedResult

router = APIRouter(tags=["Simple"])

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 413, 429, 503)
}


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=_ERRORS,
    openapi_extra=body_schema(EmbedRequest),
)
async def embed_one(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """One text in, one vector out; ``cached`` says whether the model was spared."""
    admission = await admit_request(request, runtime)
    limits = runtime.settings.limits
    body = await json_body(request, EmbedRequest, max_values=max_json_values(limits), param="text")
    check_text(body.text, None, limits, param="text")
    model = runtime.service.resolve_model(body.model or runtime.default_model, route="/embed")
    shape = output_shape(runtime.service, model, body.embedding_type)
    result, limit_headers = await _embed(
        request, runtime, admission, model, [body.text], body.input_type, "text"
    )
    return json_response(
        {
            "embedding": shape(result.vectors)[0],
            "cached": result.sources[0] in ("l1", "l2"),
            "model": result.model,
        },
        headers=limit_headers,
    )


@router.post(
    "/embed/batch",
    response_model=EmbedBatchResponse,
    responses=_ERRORS,
    openapi_extra=body_schema(EmbedBatchRequest),
)
async def embed_batch(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """Many texts in, vectors out in the same order."""
    admission = await admit_request(request, runtime)
    limits = runtime.settings.limits
    body = await json_body(
        request, EmbedBatchRequest, max_values=max_json_values(limits), param="texts"
    )
    if not body.texts:
        raise InvalidInput("'texts' must not be an empty list.", param="texts")
    check_sizes(body.texts, limits, param="texts")
    for index, text in enumerate(body.texts):
        check_text(text, index, limits, param="texts")
    model = runtime.service.resolve_model(body.model or runtime.default_model, route="/embed/batch")
    shape = output_shape(runtime.service, model, body.embedding_type)
    result, limit_headers = await _embed(
        request, runtime, admission, model, body.texts, body.input_type, "texts"
    )
    return json_response(
        {
            "embeddings": shape(result.vectors),
            "count": len(body.texts),
            "cached_count": result.cached_count,
            "model": result.model,
        },
        headers=limit_headers,
    )


async def _embed(
    request: Request,
    runtime: Runtime,
    admission: Admission,
    model: str,
    texts: list[str],
    input_type: InputType | None,
    param: str,
) -> tuple[EmbedResult, dict[str, str]]:
    """The texts' vectors (cut at the window, in the input type's prompt), charged to the
    client; and the rate-limit headers of the answer."""
    service = runtime.service
    name = service.resolve_model(model)
    options = InputOptions(prompt=service.models.get(name).prompts.resolve(input_type))
    inputs = await model_inputs(service, name, texts, options, runtime.settings.limits)
    return await embed_charged(request, runtime, admission, name, inputs, param=param)
