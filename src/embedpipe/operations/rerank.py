"""Reranking without HTTP: Cohere's v2 and Jina's shape (``/v1/rerank``, ``/v2/rerank``)
and TEI's (``/rerank``), over a cross-encoder or, by cosine, an embedding model.

Both kinds go through the EmbeddingService, so both are cached and batched like embeddings:
a cross-encoder's inputs are (query, document) pairs (``embedders/pairs.py``) whose cached
value is the pair's logit; an embedding model's inputs are the query and the documents, whose
vectors are the very cache entries ``/v1/embeddings`` writes. The routes run the steps
themselves (``prepare``, their token charge, ``rank``), and so do batch lines
(``batches/wiring.py``, which charges the batch budget).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from embedpipe import metrics
from embedpipe.embedders.cross_encoder import CrossEncoderScorer
from embedpipe.embedders.pairs import pair_text
from embedpipe.embedders.prompts import ModelPrompts
from embedpipe.embedders.registry import rerank_method
from embedpipe.errors import InvalidInput
from embedpipe.inputs import check_sizes, check_text
from embedpipe.service import EmbeddingService, EmbedResult
from embedpipe.settings import LimitsSettings

InputType = Literal["query", "document"]


class RerankRequest(BaseModel):
    """Cohere's rerank (v2, and v1's ``return_documents``) and Jina's."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(examples=["ranker"])
    # Checked by `prepare`, so that each mistake is a 400 naming its field.
    query: Any = Field(examples=["What is the capital of France?"])
    documents: Any = Field(
        description="Strings, or objects with a `text` field.",
        examples=[["Paris is the capital of France.", "Berlin is in Germany."]],
    )
    top_n: int | None = Field(None, strict=True, description="Return the best N only.")
    # Strict: a JSON 0 or "yes" is a client's mistake, not a boolean.
    return_documents: bool = Field(
        False, strict=True, description="Echo each document in its result."
    )
    max_tokens_per_doc: int | None = Field(
        None,
        strict=True,
        description="A cross-encoder sees each document's first N tokens at most (an "
        "embedding model, its window's).",
    )


class TeiRerankRequest(BaseModel):
    """Text Embeddings Inference's ``/rerank``; ``model`` is an extension (default: the
    first cross-encoder served, else the default model)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: Any = Field(examples=["What is Deep Learning?"])
    texts: Any = Field(examples=[["Deep Learning is not...", "Deep learning is..."]])
    raw_scores: bool = Field(
        False, strict=True, description="The logits, without the model's activation."
    )
    return_text: bool = Field(False, strict=True)
    # TEI's other fields (truncate, truncation_direction) are accepted: texts are always cut
    # at the model's window, as the reference library cuts them.


@dataclass(frozen=True, slots=True)
class PreparedRerank:
    model: str
    query: str
    documents: list[str]
    top_n: int | None
    # What the model computes, in order: (query, document) pairs for a cross-encoder, else
    # the query then the documents.
    inputs: list[str]
    cross_encoder: bool


@dataclass(frozen=True, slots=True)
class Ranked:
    """Documents by descending score: their positions in the request and their scores."""

    order: list[int]
    scores: list[float]
    tokens: int
    model: str


def text_for_input_type(prompts: ModelPrompts, text: str, input_type: InputType) -> str:
    """The text as the model should see it for ``input_type`` (the query, or a document):
    behind its prompt for that role, for a model that pools over its prompt (the prompt is
    then part of the text, and of its cache key, as on ``/v1/embeddings``). A model that keeps
    its prompt apart from pooling ranks the plain texts; a cross-encoder has no prompts."""
    if not prompts.in_pooling:
        return text
    return prompts.for_input_type(input_type) + text


def prepare(
    service: EmbeddingService,
    limits: LimitsSettings,
    *,
    model: str,
    route: str,
    query: Any,
    documents: Any,
    top_n: int | None = None,
    max_tokens_per_doc: int | None = None,
    documents_param: str = "documents",
) -> PreparedRerank:
    """Validate a rerank request: the model (ModelNotFound, or InvalidInput when it serves
    no rerank), the query, the documents, ``top_n`` and ``max_tokens_per_doc`` (InvalidInput
    naming the field); then the model's inputs, each document cut to ``max_tokens_per_doc``
    tokens for a cross-encoder."""
    name = service.resolve_model(model, route=route)
    if not isinstance(query, str):
        raise InvalidInput("'query' must be a string.", param="query")
    check_text(query, None, limits, param="query")
    texts = _document_texts(documents, limits, documents_param)
    check_sizes([query, *texts], _with_room_for(limits, len(texts)), param=documents_param)
    for index, text in enumerate(texts):
        check_text(text, index, limits, param=documents_param)
    if top_n is not None and top_n < 1:
        raise InvalidInput(f"'top_n' must be at least 1; got {top_n}.", param="top_n")
    if max_tokens_per_doc is not None and max_tokens_per_doc < 1:
        raise InvalidInput(
            f"'max_tokens_per_doc' must be at least 1; got {max_tokens_per_doc}.",
            param="max_tokens_per_doc",
        )
    model_served = service.models.get(name)
    cross_encoder = model_served.info.task == "rerank"
    query_seen = text_for_input_type(model_served.prompts, query, "query")
    seen = [text_for_input_type(model_served.prompts, text, "document") for text in texts]
    # Cut the documents only: the response echoes them whole.
    if max_tokens_per_doc is not None and isinstance(model_served, CrossEncoderScorer):
        seen = model_served.first_tokens(seen, max_tokens_per_doc)
    if cross_encoder:
        inputs = [pair_text(query_seen, text) for text in seen]
    else:
        inputs = [query_seen, *seen]
    return PreparedRerank(name, query, texts, top_n, inputs, cross_encoder)


def _document_texts(documents: Any, limits: LimitsSettings, param: str) -> list[str]:
    if not isinstance(documents, list):
        raise InvalidInput(f"'{param}' must be a list of documents.", param=param)
    if not documents:
        raise InvalidInput(f"'{param}' must hold at least one document.", param=param)
    if len(documents) > limits.max_rerank_documents:
        raise InvalidInput(
            f"'{param}' holds {len(documents)} documents; at most "
            f"{limits.max_rerank_documents} are allowed.",
            param=param,
        )
    texts = []
    for index, document in enumerate(documents):
        if isinstance(document, dict) and isinstance(document.get("text"), str):
            document = document["text"]
        if not isinstance(document, str):
            raise InvalidInput(
                f"'{param}[{index}]' must be a string or an object with a string 'text'.",
                param=param,
            )
        texts.append(document)
    return texts


def _with_room_for(limits: LimitsSettings, documents: int) -> LimitsSettings:
    """The limits for the query and its documents: the rerank bound, not ``max_inputs``,
    caps how many documents there are."""
    return limits.model_copy(update={"max_inputs": max(limits.max_inputs, documents + 1)})


def rank(
    service: EmbeddingService, prepared: PreparedRerank, result: EmbedResult, *, raw: bool
) -> Ranked:
    """Scores from the model's outputs, best first (ties: request order). A cross-encoder's
    score is ``CrossEncoder.predict``'s (its activation on the logit; ``raw``: the logit);
    an embedding model's is the cosine of each document's vector to the query's."""
    if prepared.cross_encoder:
        logits = np.ascontiguousarray(result.vectors[:, 0])
        scorer = service.models.get(prepared.model)
        if raw or not isinstance(scorer, CrossEncoderScorer):
            scores = logits
        else:
            scores = scorer.activate(logits)
    else:
        # The vectors are L2-normalised: the dot product is the cosine.
        scores = result.vectors[1:] @ result.vectors[0]
    method = rerank_method(service.models.get(prepared.model).info)
    metrics.RERANK_DOCUMENTS.labels(model=prepared.model, method=method).inc(len(scores))
    order = sorted(range(len(scores)), key=lambda position: -float(scores[position]))
    if prepared.top_n is not None:
        order = order[: prepared.top_n]
    return Ranked(order, [float(scores[i]) for i in order], result.tokens, result.model)


def cohere_body(
    prepared: PreparedRerank, ranked: Ranked, *, return_documents: bool
) -> dict[str, Any]:
    """Cohere's v2 response, with Jina's ``model`` and ``usage`` beside it."""
    results = []
    for index, score in zip(ranked.order, ranked.scores, strict=True):
        item: dict[str, Any] = {"index": index, "relevance_score": score}
        if return_documents:
            item["document"] = {"text": prepared.documents[index]}
        results.append(item)
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "model": ranked.model,
        # Cohere bills a search unit per query and up to 100 documents.
        "meta": {
            "api_version": {"version": "2"},
            "billed_units": {"search_units": -(-len(prepared.documents) // 100)},
        },
        "usage": {"total_tokens": ranked.tokens},
    }


def tei_body(
    prepared: PreparedRerank, ranked: Ranked, *, return_text: bool
) -> list[dict[str, Any]]:
    """TEI's response: a list of ``{index, score, text?}``, best first."""
    answer = []
    for index, score in zip(ranked.order, ranked.scores, strict=True):
        item: dict[str, Any] = {"index": index, "score": score}
        if return_text:
            item["text"] = prepared.documents[index]
        answer.append(item)
    return answer
