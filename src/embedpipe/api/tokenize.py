"""TEI-compatible ``POST /tokenize``: the tokens a served model sees for each input."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from starlette.responses import Response

from embedpipe.api.deps import body_schema, get_runtime, json_body, json_response, off_loop_if_big
from embedpipe.api.schemas import ErrorBody
from embedpipe.api.security import admit_request, charge_tokens
from embedpipe.inputs import max_json_values
from embedpipe.operations.tokenize import TokenizeRequest, tokenize
from embedpipe.runtime import Runtime

router = APIRouter(tags=["TEI-compatible"])

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 413, 429, 503)
}


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


@router.post(
    "/tokenize",
    response_model=list[list[SimpleToken]],
    responses=_ERRORS,
    openapi_extra=body_schema(TokenizeRequest),
)
async def tokenize_inputs(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> Response:
    """Token ids and tokens of each input, as TEI's ``/tokenize`` answers them."""
    admission = await admit_request(request, runtime)
    limits = runtime.settings.limits
    body = await json_body(
        request, TokenizeRequest, max_values=max_json_values(limits), param="inputs"
    )
    answer = await off_loop_if_big(
        request, tokenize, runtime.service, limits, body, runtime.default_model
    )
    tokens = sum(len(tokens) for tokens in answer)
    limit_headers = await charge_tokens(admission, runtime, tokens, param="inputs")
    return json_response(answer, headers=limit_headers)
