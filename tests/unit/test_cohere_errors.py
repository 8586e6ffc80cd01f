"""Cohere's routes answer errors in Cohere's shape (``{"id", "message"}``) whichever layer
refused the request, with the status and headers unchanged; other routes keep OpenAI's
envelope. On the real application over a fake model, and on a bare ASGI app for the framing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from embedpipe.api.cohere_errors import COHERE_PATHS, CohereErrorMiddleware
from embedpipe.settings import LimitsSettings, Settings
from tests.fakes import fake_app


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        data_dir=tmp_path / "data",
        api_keys="sk-good",
        limits=LimitsSettings(max_body_bytes=4096),
    )
    app, runtime = fake_app(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000"
    ) as client:
        yield client
    await runtime.close()


@pytest.mark.parametrize("path", COHERE_PATHS)
async def test_a_refused_key_is_a_cohere_error_with_the_request_id(
    client: httpx.AsyncClient, path: str
) -> None:
    reply = await client.post(
        path, json={"texts": ["hi"]}, headers={"x-request-id": "req-1", "Authorization": "Bearer x"}
    )
    assert reply.status_code == 401
    body = reply.json()
    assert body == {"id": "req-1", "message": body["message"]}
    assert body["message"]
    assert int(reply.headers["content-length"]) == len(reply.content)


async def test_a_body_over_the_limit_keeps_its_status(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/v2/embed",
        content=b"x" * 5000,
        headers={"Authorization": "Bearer sk-good", "content-type": "application/json"},
    )
    assert reply.status_code == 413
    assert set(reply.json()) == {"id", "message"}


async def test_other_routes_keep_openais_envelope(client: httpx.AsyncClient) -> None:
    reply = await client.post("/v1/embeddings", json={"input": "hi", "model": "fake"})
    assert reply.status_code == 401
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers per path: a success, a non-JSON error, and an error body in two chunks."""
    path = scope["path"]
    status = 200 if path == "/ok" else 500
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if path == "/ok":
        await send({"type": "http.response.body", "body": b'{"error": {"message": "no"}}'})
    elif path == "/text":
        await send({"type": "http.response.body", "body": b"plain failure"})
    else:
        await send({"type": "http.response.body", "body": b'{"error": {"mess', "more_body": True})
        await send({"type": "http.response.body", "body": b'age": "broke"}}'})


@pytest.mark.parametrize(
    ("path", "status", "expected"),
    [
        ("/ok", 200, {"error": {"message": "no"}}),  # a success is never rewritten
        ("/chunked", 500, {"id": "", "message": "broke"}),
    ],
)
async def test_only_error_envelopes_are_rewritten(
    path: str, status: int, expected: dict[str, object]
) -> None:
    app = CohereErrorMiddleware(_app, paths=["/ok", "/chunked", "/text"])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        reply = await client.get(path)
    assert reply.status_code == status
    assert orjson.loads(reply.content) == expected


async def test_a_body_that_is_not_an_envelope_passes_as_it_is() -> None:
    app = CohereErrorMiddleware(_app, paths=["/text"])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        reply = await client.get("/text")
    assert (reply.status_code, reply.content) == (500, b"plain failure")
