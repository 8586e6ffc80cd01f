"""The steps every embeddings route runs, in one order: ``/v1/embeddings`` and Cohere's
``/v2/embed`` (which reads its own body, then asks through an ``EmbeddingRequest``); the
simple API shares the last of them (:func:`embed_charged`)."""

from __future__ import annotations

from fastapi import Request

from embedpipe.api.deps import off_loop_if_big, unless_disconnected
from embedpipe.api.security import Admission, charge_tokens
from embedpipe.operations.model_inputs import ModelInputs
from embedpipe.operations.openai_embeddings import (
    EmbeddingRequest,
    PreparedRequest,
    prepare,
    prepare_inputs,
)
from embedpipe.runtime import Runtime
from embedpipe.service import EmbedResult


async def embed_request(
    request: Request,
    runtime: Runtime,
    admission: Admission,
    body: EmbeddingRequest,
    *,
    param: str = "input",
) -> tuple[PreparedRequest, EmbedResult, dict[str, str]]:
    """Validate, cut, count, charge and embed ``body`` (admitted already): the prepared
    request, the vectors and the ``x-ratelimit-*`` headers. ``param``: the field holding the
    texts, named in a 400."""
    limits = runtime.settings.limits
    service = runtime.service
    route = request.url.path  # a cross-encoder is refused, naming the routes it serves
    prepared = await off_loop_if_big(
        request, prepare, service, runtime.token_decoder, limits, body, route
    )
    # Cut at the window (or into windows) before anything tokenizes a whole long text, then
    # counted once: the token budget is charged what `usage` reports, before any model work.
    inputs = await prepare_inputs(service, limits, prepared)
    result, limit_headers = await embed_charged(
        request,
        runtime,
        admission,
        prepared.model,
        inputs,
        dimensions=prepared.dimensions,
        param=param,
    )
    return prepared, result, limit_headers


async def embed_charged(
    request: Request,
    runtime: Runtime,
    admission: Admission,
    model: str,
    inputs: ModelInputs,
    *,
    dimensions: int | None = None,
    param: str,
) -> tuple[EmbedResult, dict[str, str]]:
    """Charge ``inputs``' tokens to the client, then one vector per input (long inputs'
    windows combined); and the ``x-ratelimit-*`` headers."""
    limit_headers = await charge_tokens(admission, runtime, inputs.total_tokens, param=param)
    service = runtime.service
    # From L1 without a task; only work that may wait is watched for a client going away.
    result = service.embed_from_memory(
        model, inputs.texts, inputs.tokens, dimensions=dimensions, form=inputs.form
    )
    if result is None:
        embedding = service.embed(
            model, inputs.texts, inputs.tokens, dimensions=dimensions, form=inputs.form
        )
        result = await unless_disconnected(request, embedding)
    return inputs.combine(result), limit_headers
