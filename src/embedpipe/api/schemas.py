"""Wire models only: what clients send and get. Validation of ``input`` lives in inputs.py;
OpenAI's embeddings request lives with its operation (``operations/openai_embeddings.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from embedpipe.embedders.prompts import InputType
from embedpipe.quantization import EmbeddingType

_INPUT_TYPE = "What the texts are, to pick the model's prompt (as on /v1/embeddings)."
_EMBEDDING_TYPE = (
    "The vector's type: float32, float16, int8, uint8 (fixed per-model buckets), binary or "
    "ubinary (sign bits packed 8 to a byte); as JSON numbers."
)


class EmbedRequest(BaseModel):
    text: str = Field(examples=["hello world"])
    model: str | None = Field(None, description="Defaults to the server's default model.")
    input_type: InputType | None = Field(None, description=_INPUT_TYPE)
    embedding_type: EmbeddingType = Field("float32", description=_EMBEDDING_TYPE)


class EmbedBatchRequest(BaseModel):
    texts: list[str] = Field(examples=[["hello", "world"]])
    model: str | None = None
    input_type: InputType | None = Field(None, description=_INPUT_TYPE)
    embedding_type: EmbeddingType = Field("float32", description=_EMBEDDING_TYPE)


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class EmbedResponse(BaseModel):
    embedding: list[float]
    cached: bool
    model: str


class EmbedBatchResponse(BaseModel):
    embeddings: list[list[float]]
    count: int
    cached_count: int
    model: str


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embedpipe"
    # Extensions beside OpenAI's fields: what the model computes and the routes serving it.
    capabilities: list[Literal["embeddings", "rerank"]] = []
    endpoints: list[str] = []


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankBilledUnits(BaseModel):
    search_units: int


class RerankApiVersion(BaseModel):
    version: str


class RerankMeta(BaseModel):
    api_version: RerankApiVersion
    billed_units: RerankBilledUnits


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    """Cohere's v2 rerank response, with Jina's ``model`` and ``usage``."""

    id: str
    results: list[RerankResult]
    model: str
    meta: RerankMeta
    usage: RerankUsage


class TeiRerankItem(BaseModel):
    index: int
    score: float
    text: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class CohereErrorBody(BaseModel):
    """Errors on Cohere's routes (``COHERE_PATHS`` in ``api/cohere_errors.py``)."""

    id: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class CohereEmbeddingsByType(BaseModel):
    float_: list[list[float]] | None = Field(None, alias="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereBilledUnits(BaseModel):
    input_tokens: int


class CohereMeta(BaseModel):
    api_version: dict[str, str]
    billed_units: CohereBilledUnits


class CohereEmbedResponse(BaseModel):
    id: str
    embeddings: CohereEmbeddingsByType
    texts: list[str]
    meta: CohereMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
