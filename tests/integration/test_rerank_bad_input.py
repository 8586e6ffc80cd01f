"""Every malformed rerank request gets a 4xx naming its field, never a 500: in Cohere's shape
(``{"id", "message"}``) on /v1/rerank and /v2/rerank, in OpenAI's envelope on TEI's /rerank;
and a model asked for a route it does not serve says which routes it serves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cross_encoder import CROSS_ENCODER
from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

OK: dict[str, Any] = {"model": CROSS_ENCODER, "query": "a query", "documents": ["a", "b"]}

# (name, body, expected status, the field the error names)
CATALOGUE: list[tuple[str, Any, int, str]] = [
    ("empty query", {**OK, "query": ""}, 400, "query"),
    ("query not a string", {**OK, "query": 42}, 400, "query"),
    ("query missing", {"model": CROSS_ENCODER, "documents": ["a"]}, 400, "query"),
    ("no documents", {**OK, "documents": []}, 400, "documents"),
    ("documents missing", {"model": CROSS_ENCODER, "query": "q"}, 400, "documents"),
    ("documents not a list", {**OK, "documents": "a b"}, 400, "documents"),
    ("too many documents", {**OK, "documents": ["d"] * 1001}, 400, "documents"),
    ("document a number", {**OK, "documents": ["a", 42]}, 400, "documents[1]"),
    ("document null", {**OK, "documents": [None]}, 400, "documents[0]"),
    ("object without text", {**OK, "documents": [{"title": "a"}]}, 400, "documents[0]"),
    ("text not a string", {**OK, "documents": [{"text": 5}]}, 400, "documents[0]"),
    ("empty document", {**OK, "documents": ["a", ""]}, 400, "documents[1]"),
    ("top_n zero", {**OK, "top_n": 0}, 400, "top_n"),
    ("top_n negative", {**OK, "top_n": -3}, 400, "top_n"),
    ("top_n a string", {**OK, "top_n": "2"}, 400, "top_n"),
    ("max_tokens_per_doc zero", {**OK, "max_tokens_per_doc": 0}, 400, "max_tokens_per_doc"),
    ("model missing", {"query": "q", "documents": ["a"]}, 400, "model"),
    ("unknown model", {**OK, "model": "rerank-english-v9"}, 404, "model"),
]


@pytest.fixture(scope="module")
def http(rerank_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rerank_server.url, timeout=60) as client:
        yield client


def _assert_cohere_error(reply: httpx.Response, status: int, field: str) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"id", "message"}, body
    assert f"'{field}" in body["message"] or f"'{field}'" in body["message"], body
    assert "Traceback" not in reply.text
    message: str = body["message"]
    return message


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize(
    ("body", "status", "field"),
    [case[1:] for case in CATALOGUE],
    ids=[case[0] for case in CATALOGUE],
)
def test_cohere_routes_refuse_bad_input(
    http: httpx.Client, path: str, body: Any, status: int, field: str
) -> None:
    if field == "model" and status == 404:
        reply = http.post(path, json=body)
        assert reply.status_code == 404 and set(reply.json()) == {"id", "message"}
        assert "rerank-english-v9" in reply.json()["message"]
        return
    _assert_cohere_error(http.post(path, json=body), status, field)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "", "texts": ["a"]}, "query"),
        ({"query": "q", "texts": []}, "texts"),
        ({"query": "q", "texts": ["a", {"x": 1}]}, "texts"),
        ({"query": "q", "texts": ["a"], "model": "nope"}, "model"),
        ({"query": "q", "texts": ["a"], "raw_scores": [1]}, "raw_scores"),
    ],
)
def test_tei_route_refuses_bad_input_in_openai_envelope(
    http: httpx.Client, body: Any, param: str
) -> None:
    reply = http.post("/rerank", json=body)
    assert reply.status_code in (400, 404), reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": CROSS_ENCODER, "input": "hello"}),
        ("/embed", {"model": CROSS_ENCODER, "text": "hello"}),
        ("/embed/batch", {"model": CROSS_ENCODER, "texts": ["hello"]}),
    ],
)
def test_embedding_routes_refuse_a_cross_encoder_naming_its_routes(
    http: httpx.Client, path: str, body: Any
) -> None:
    reply = http.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_supported"
    assert "/v1/rerank" in error["message"] and path in error["message"]


def test_the_embedding_model_still_embeds_beside_the_cross_encoder(http: httpx.Client) -> None:
    reply = http.post("/v1/embeddings", json={"model": MODEL, "input": "hello"})
    assert reply.status_code == 200, reply.text
