"""Wire models only: what clients send and get. Validation of ``input`` lives in inputs.py;
OpenAI's embeddings request lives with its operation (``operations/openai_embeddings.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from embedpipe.embedders.prompts import InputType

_INPUT_TYPE = "What the texts are, to pick the model's prompt (as on /v1/embeddings)."


class EmbedRequest(BaseModel):
    text: str = Field(examples=["hello world"])
    model: str | None = Field(None, description="Defaults to the server's default model.")
    input_type: InputType | None = Field(None, description=_INPUT_TYPE)


class EmbedBatchRequest(BaseModel):
    texts: list[str] = Field(examples=[["hello", "world"]])
    model: str | None = None
    input_type: InputType | None = Field(None, description=_INPUT_TYPE)


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
