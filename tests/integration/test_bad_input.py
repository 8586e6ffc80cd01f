"""Every malformed request gets a 4xx in OpenAI's envelope: never a 500, never a trace."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

OK = {"model": MODEL, "input": "hello"}

# (name, method, path, body (json object, or raw bytes), expected status, expected param)
CATALOGUE: list[tuple[str, str, str, Any, int, str | None]] = [
    ("invalid json", "POST", "/v1/embeddings", b'{"model": "x", "input": ', 400, None),
    ("body is a list", "POST", "/v1/embeddings", [1, 2], 400, None),
    ("body is a string", "POST", "/v1/embeddings", "hello", 400, None),
    ("empty body", "POST", "/v1/embeddings", b"", 400, None),
    ("missing input", "POST", "/v1/embeddings", {"model": MODEL}, 400, "input"),
    ("missing model", "POST", "/v1/embeddings", {"input": "x"}, 400, "model"),
    ("model not a string", "POST", "/v1/embeddings", {"model": 3, "input": "x"}, 400, "model"),
    ("unknown model", "POST", "/v1/embeddings", {"model": "gpt-9", "input": "x"}, 404, "model"),
    ("empty string", "POST", "/v1/embeddings", {**OK, "input": ""}, 400, "input"),
    ("empty list", "POST", "/v1/embeddings", {**OK, "input": []}, 400, "input"),
    ("empty string in list", "POST", "/v1/embeddings", {**OK, "input": ["a", ""]}, 400, "input"),
    ("number", "POST", "/v1/embeddings", {**OK, "input": 42}, 400, "input"),
    ("null", "POST", "/v1/embeddings", {**OK, "input": None}, 400, "input"),
    ("object", "POST", "/v1/embeddings", {**OK, "input": {"a": 1}}, 400, "input"),
    ("nested lists", "POST", "/v1/embeddings", {**OK, "input": [[["a"]]]}, 400, "input"),
    ("mixed types", "POST", "/v1/embeddings", {**OK, "input": ["a", 1]}, 400, "input"),
    ("floats", "POST", "/v1/embeddings", {**OK, "input": [1.5, 2.5]}, 400, "input"),
    ("booleans", "POST", "/v1/embeddings", {**OK, "input": [True]}, 400, "input"),
    ("negative token", "POST", "/v1/embeddings", {**OK, "input": [-5]}, 400, "input"),
    ("huge token", "POST", "/v1/embeddings", {**OK, "input": [2**40]}, 400, "input"),
    ("undefined token", "POST", "/v1/embeddings", {**OK, "input": [100256]}, 400, "input"),
    ("too many inputs", "POST", "/v1/embeddings", {**OK, "input": ["a"] * 2049}, 400, "input"),
    (
        "bad encoding",
        "POST",
        "/v1/embeddings",
        {**OK, "encoding_format": "int8"},
        400,
        "encoding_format",
    ),
    ("dimensions zero", "POST", "/v1/embeddings", {**OK, "dimensions": 0}, 400, "dimensions"),
    ("dimensions negative", "POST", "/v1/embeddings", {**OK, "dimensions": -1}, 400, "dimensions"),
    ("dimensions too big", "POST", "/v1/embeddings", {**OK, "dimensions": 385}, 400, "dimensions"),
    ("dimensions string", "POST", "/v1/embeddings", {**OK, "dimensions": "ten"}, 400, "dimensions"),
    ("dimensions float", "POST", "/v1/embeddings", {**OK, "dimensions": 1.5}, 400, "dimensions"),
    ("dimensions true", "POST", "/v1/embeddings", {**OK, "dimensions": True}, 400, "dimensions"),
    (
        "dimensions numeric string",
        "POST",
        "/v1/embeddings",
        {**OK, "dimensions": "8"},
        400,
        "dimensions",
    ),
    (
        "input_type unknown",
        "POST",
        "/v1/embeddings",
        {**OK, "input_type": "passage"},
        400,
        "input_type",
    ),
    ("input_type number", "POST", "/v1/embeddings", {**OK, "input_type": 1}, 400, "input_type"),
    (
        "prompt_name unknown",
        "POST",
        "/v1/embeddings",
        {**OK, "prompt_name": "query:"},
        400,
        "prompt_name",
    ),
    ("prompt_name number", "POST", "/v1/embeddings", {**OK, "prompt_name": 7}, 400, "prompt_name"),
    ("truncate string", "POST", "/v1/embeddings", {**OK, "truncate": "false"}, 400, "truncate"),
    ("truncate number", "POST", "/v1/embeddings", {**OK, "truncate": 0}, 400, "truncate"),
    (
        "truncate false over the window",
        "POST",
        "/v1/embeddings",
        {**OK, "input": ["fits", "word " * 300], "truncate": False},
        400,
        "input",
    ),
    (
        "truncation direction unknown",
        "POST",
        "/v1/embeddings",
        {**OK, "truncation_direction": "middle"},
        400,
        "truncation_direction",
    ),
    ("long_text unknown", "POST", "/v1/embeddings", {**OK, "long_text": "max"}, 400, "long_text"),
    (
        "long_text past its limit",
        "POST",
        "/v1/embeddings",
        {**OK, "input": "word " * 9000, "long_text": "mean"},
        400,
        "input",
    ),
    (
        "embed input_type unknown",
        "POST",
        "/embed",
        {"text": "a", "input_type": "x"},
        400,
        "input_type",
    ),
    ("tokenize no inputs", "POST", "/tokenize", {}, 400, "inputs"),
    ("tokenize numbers", "POST", "/tokenize", {"inputs": [1, 2]}, 400, "inputs"),
    ("tokenize unknown model", "POST", "/tokenize", {"inputs": "a", "model": "x"}, 404, "model"),
    (
        "tokenize over the window",
        "POST",
        "/tokenize",
        {"inputs": "word " * 300, "truncate": False},
        400,
        "inputs",
    ),
    ("embed empty text", "POST", "/embed", {"text": ""}, 400, "text"),
    ("embed missing text", "POST", "/embed", {}, 400, "text"),
    ("embed text list", "POST", "/embed", {"text": ["a"]}, 400, "text"),
    ("embed unknown model", "POST", "/embed", {"text": "a", "model": "nope"}, 404, "model"),
    ("batch empty", "POST", "/embed/batch", {"texts": []}, 400, "texts"),
    ("batch not list", "POST", "/embed/batch", {"texts": "a"}, 400, "texts"),
    ("batch numbers", "POST", "/embed/batch", {"texts": [1, 2]}, 400, "texts.0"),
    ("batch empty item", "POST", "/embed/batch", {"texts": ["a", ""]}, 400, "texts"),
    ("batch too many", "POST", "/embed/batch", {"texts": ["a"] * 2049}, 400, "texts"),
    # An unpaired UTF-16 surrogate is valid JSON grammar but not Unicode: once stored (batch
    # metadata), no answer or listing could serialise it (this was a 500).
    (
        "unpaired surrogate",
        "POST",
        "/v1/batches",
        b'{"input_file_id": "file-x\\ud800", "endpoint": "/v1/embeddings"}',
        400,
        None,
    ),
    (
        "surrogate in input",
        "POST",
        "/v1/embeddings",
        b'{"model": "m", "input": "\\udfff"}',
        400,
        None,
    ),
    (
        "deep nesting",
        "POST",
        "/v1/embeddings",
        b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        None,
    ),
    ("unknown route", "GET", "/v2/nothing", None, 404, None),
    ("wrong method", "GET", "/v1/embeddings", None, 405, None),
    ("unknown model id", "GET", "/v1/models/nope", None, 404, "model"),
]


@pytest.fixture(scope="module")
def http(embedded_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded_server.url, timeout=60) as client:
        yield client


def _assert_envelope(reply: httpx.Response, status: int, param: str | None) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in reply.text and 'File "' not in reply.text
    assert error["param"] == param


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [case[1:] for case in CATALOGUE],
    ids=[case[0] for case in CATALOGUE],
)
def test_bad_request_gets_a_clear_4xx(
    http: httpx.Client, method: str, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, bytes):
        reply = http.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
    elif body is None:
        reply = http.request(method, path)
    else:
        reply = http.request(method, path, json=body)
    _assert_envelope(reply, status, param)


def test_20_mb_body_is_refused_with_413(http: httpx.Client) -> None:
    body = b'{"model": "all-MiniLM-L6-v2", "input": "' + b"a" * (20 * 1024 * 1024) + b'"}'
    reply = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    _assert_envelope(reply, 413, None)


def test_20_mb_chunked_body_without_length_is_refused_with_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "all-MiniLM-L6-v2", "input": "'
        for _ in range(20):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    reply = http.post(
        "/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}
    )
    _assert_envelope(reply, 413, None)


def test_the_service_still_serves_after_the_catalogue(http: httpx.Client) -> None:
    reply = http.post("/v1/embeddings", json=OK)
    assert reply.status_code == 200
