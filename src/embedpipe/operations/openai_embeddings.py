"""OpenAI's embeddings operation without HTTP: a request body in, a response body out.

The ``/v1/embeddings`` route and batch jobs both answer through these functions, so a batch
line gets exactly what the same request would get online. The steps, which the route runs
itself around its own token charge::

    prepared = prepare(service, decoder, limits, request)      # model, prompt, texts (400s)
    inputs = await prepare_inputs(service, limits, prepared)   # clip/windows, counts (400s)
    ... charge inputs.total_tokens ...
    result = await embed_inputs(service, prepared, inputs)     # windows combined
    body = respond(prepared, result)

``create_embeddings`` runs them all (no charge) for callers that charge elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from embedpipe.embedders.prompts import InputType
from embedpipe.embedders.tokens import LongText, Truncation
from embedpipe.inputs import TokenDecoder, normalize_input
from embedpipe.operations.model_inputs import InputOptions, ModelInputs, model_inputs
from embedpipe.quantization import (
    Calibration,
    EmbeddingType,
    ServedRows,
    check_output_type,
    json_ready,
    served_as,
    to_base64_of_type,
)
from embedpipe.service import EmbeddingService, EmbedResult
from embedpipe.settings import LimitsSettings
from embedpipe.vectors import check_dimensions, truncate


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
    # Extensions (the OpenAI SDK sends them through ``extra_body``).
    input_type: InputType | None = Field(
        None,
        description="What the texts are, to pick the model's prompt: query or document (or "
        "Cohere's search_query, search_document, classification, clustering). A model without "
        "prompts accepts it and answers as without.",
    )
    prompt_name: str | None = Field(
        None, description="A prompt of the model by name (wins over input_type)."
    )
    truncate: bool = Field(
        True,
        strict=True,
        description="false: an input longer than the model's window is refused (400), not cut.",
    )
    truncation_direction: Truncation = Field(
        "right", description="Which end of a text past the window is cut: right keeps its start."
    )
    long_text: LongText = Field(
        "truncate",
        description='"mean": an input longer than the window is embedded as the token-weighted '
        "mean of its windows.",
    )
    embedding_type: EmbeddingType = Field(
        "float32",
        description="The vectors' type, applied after `dimensions`: float32, float16, int8 and "
        "uint8 (per-dimension buckets fixed per model), binary and ubinary (sign bits packed "
        "8 to a byte, as signed or unsigned bytes). `float` encoding gives JSON numbers, "
        "`base64` the raw bytes of the type.",
    )


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    model: str
    texts: list[str]
    dimensions: int | None
    encoding_format: str
    embedding_type: EmbeddingType = "float32"
    calibration: Calibration | None = None
    options: InputOptions = field(default_factory=InputOptions)
    # The service's compact rows served lately (None: quantise every time, as batch lines do).
    remembered: ServedRows | None = None


def prepare(
    service: EmbeddingService,
    decoder: TokenDecoder,
    limits: LimitsSettings,
    request: EmbeddingRequest,
    route: str = "/v1/embeddings",
) -> PreparedRequest:
    """Validate the request: the served model (one that serves ``route``), its prompt,
    ``dimensions`` and the texts (InvalidInput or ModelNotFound otherwise)."""
    model = service.resolve_model(request.model, route=route)
    served = service.models.get(model)
    options = InputOptions(
        prompt=served.prompts.resolve(request.input_type, request.prompt_name),
        truncate=request.truncate,
        truncation=request.truncation_direction,
        long_text=request.long_text,
    )
    dimensions = check_dimensions(request.dimensions, served.info.dimensions)
    calibration = service.calibration(model)
    check_output_type(
        request.embedding_type,
        dimensions or served.info.dimensions,
        calibration,
        dimensions_param="dimensions" if dimensions else None,
    )
    texts = normalize_input(request.input, limits, decoder)
    return PreparedRequest(
        model,
        texts,
        dimensions,
        request.encoding_format,
        request.embedding_type,
        calibration,
        options,
        service.served_rows,
    )


async def prepare_inputs(
    service: EmbeddingService, limits: LimitsSettings, prepared: PreparedRequest
) -> ModelInputs:
    """The model's inputs and their tokens (InvalidInput for a text over the window with
    ``truncate: false``, or past the long-text limit): charge ``total_tokens`` next."""
    return await model_inputs(service, prepared.model, prepared.texts, prepared.options, limits)


async def embed_inputs(
    service: EmbeddingService,
    prepared: PreparedRequest,
    inputs: ModelInputs,
    *,
    background: bool = False,
) -> EmbedResult:
    """One vector per input (long inputs' windows combined)."""
    result = await service.embed(
        prepared.model,
        inputs.texts,
        inputs.tokens,
        dimensions=prepared.dimensions,
        background=background,
        form=inputs.form,
    )
    return inputs.combine(result)


def output_vectors(
    prepared: PreparedRequest, result: EmbedResult, embedding_type: EmbeddingType
) -> npt.NDArray[np.generic]:
    """The result's vectors cut to ``dimensions`` (renormalised), then made ``embedding_type``:
    always in that order, so int8 buckets and sign bits are those of the vector served."""
    vectors = truncate(result.vectors, prepared.dimensions)
    return served_as(
        result.model, vectors, embedding_type, prepared.calibration, prepared.remembered
    )


def respond(prepared: PreparedRequest, result: EmbedResult) -> dict[str, Any]:
    """The response body (float vectors stay float32 arrays: serialise with orjson's numpy
    option)."""
    embedding_type = prepared.embedding_type
    vectors = output_vectors(prepared, result, embedding_type)
    embeddings: list[Any]
    if prepared.encoding_format == "base64":
        embeddings = [to_base64_of_type(vector, embedding_type) for vector in vectors]
    else:
        embeddings = [json_ready(vector) for vector in vectors]
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": embedding}
            for index, embedding in enumerate(embeddings)
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
    inputs = await prepare_inputs(service, limits, prepared)
    return respond(prepared, await embed_inputs(service, prepared, inputs))
