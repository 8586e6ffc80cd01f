"""Size limits: each is a setting (env ``EMBEDPIPE_LIMITS__*``) and is answered in the error
envelope: 413 for the body, 400 for the number of inputs and for characters per input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from embedpipe.settings import Settings
from tests.fakes import fake_app


@pytest.fixture
async def client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("EMBEDPIPE_LIMITS__MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("EMBEDPIPE_LIMITS__MAX_INPUTS", "3")
    monkeypatch.setenv("EMBEDPIPE_LIMITS__MAX_INPUT_CHARS", "10")
    settings = Settings(data_dir=tmp_path)
    assert (settings.limits.max_body_bytes, settings.limits.max_inputs) == (2048, 3)
    app, runtime = fake_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client
    await runtime.close()


def _error(reply: httpx.Response, status: int, param: str | None) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    message: str = error["message"]
    return message


async def test_body_size(client: httpx.AsyncClient) -> None:
    big = {"model": "fake", "input": "x" * 3000}
    assert "2048 bytes" in _error(await client.post("/v1/embeddings", json=big), 413, None)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(10):
            yield b" " * 512

    streamed = await client.post(
        "/embed", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "2048 bytes" in _error(streamed, 413, None)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"model": "fake", "input": ["a", "b", "c", "d"]}, "input"),
        ("/embed/batch", {"texts": ["a", "b", "c", "d"]}, "texts"),
    ],
)
async def test_inputs_per_request(
    client: httpx.AsyncClient, path: str, body: dict[str, object], param: str
) -> None:
    assert "at most 3" in _error(await client.post(path, json=body), 400, param)
    body = {**body, param: ["a", "b", "c"]}
    assert (await client.post(path, json=body)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"model": "fake", "input": "x" * 11}, "input"),
        ("/v1/embeddings", {"model": "fake", "input": ["ok", "x" * 11]}, "input"),
        ("/embed", {"text": "x" * 11}, "text"),
        ("/embed/batch", {"texts": ["ok", "x" * 11]}, "texts"),
    ],
)
async def test_characters_per_input(
    client: httpx.AsyncClient, path: str, body: dict[str, object], param: str
) -> None:
    assert "at most 10" in _error(await client.post(path, json=body), 400, param)
