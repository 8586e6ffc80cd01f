"""Wire models only: what clients send and get. Validation of ``input`` lives in inputs.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


class EmbedRequest(BaseModel):
    text: str = Field(examples=["hello world"])
    model: str | None = Field(None, description="Defaults to the server's default model.")


class EmbedBatchRequest(BaseModel):
    texts: list[str] = Field(examples=[["hello", "world"]])
    model: str | None = None


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail
