"""What a web page could make the server do without a key, and what it cannot any more: no
``text/plain`` or form bodies read as JSON (no CORS preflight needed for those), no answers to
a rebound ``Host``, no POST from another site; and no more than ``http.max_headers`` headers.
On the real application over a fake model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedpipe.api.request_guard import HostRule, allowed_hosts
from embedpipe.runtime import Runtime
from embedpipe.settings import HttpSettings, SecuritySettings, Settings
from tests.fakes import fake_app

Serve = Callable[..., Awaitable[httpx.AsyncClient]]
EMBED = {"model": "fake", "input": "hello"}


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    opened: list[tuple[Runtime, httpx.AsyncClient]] = []

    async def start(base_url: str = "http://localhost:8000", **overrides: Any) -> httpx.AsyncClient:
        app, runtime = fake_app(Settings(data_dir=tmp_path / "data", **overrides))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)
        opened.append((runtime, client))
        return client

    yield start
    for runtime, client in opened:
        await client.aclose()
        await runtime.close()


def _code(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    code: str = error["code"]
    return code


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"],
)
@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed", "/embed/batch", "/v1/batches"])
async def test_a_body_a_page_may_send_without_preflight_is_refused(
    serve: Serve, path: str, content_type: str | None
) -> None:
    client = await serve()
    headers = {"content-type": content_type} if content_type else {}
    reply = await client.post(path, content=b'{"model": "fake", "input": "hello"}', headers=headers)
    assert _code(reply, 415) == "unsupported_media_type"
    assert "application/json" in reply.json()["error"]["message"]


async def test_json_and_uploads_pass(serve: Serve) -> None:
    client = await serve()
    assert (await client.post("/v1/embeddings", json=EMBED)).status_code == 200
    typed = {"content-type": "application/json; charset=utf-8"}
    reply = await client.post("/embed", content=b'{"text": "x"}', headers=typed)
    assert reply.status_code == 200
    # Uploads are multipart (the SDK's test: tests/integration/test_batches.py); JSON there
    # is refused.
    assert _code(await client.post("/v1/files", json={"purpose": "batch"}), 415)


async def test_a_post_without_a_body_needs_no_content_type(serve: Serve) -> None:
    # `curl -X POST .../cancel` sends no body and no type: it reaches the route (here a 400
    # for the missing body, not a 415).
    client = await serve()
    assert _code(await client.post("/embed"), 400) != "unsupported_media_type"


@pytest.mark.parametrize("host", ["evil.example", "rebound.attacker.test:8000", "10.0.0.1"])
async def test_a_rebound_host_is_refused_on_loopback(serve: Serve, host: str) -> None:
    client = await serve()
    for reply in (
        await client.get("/v1/files", headers={"host": host}),
        await client.get("/v1/models", headers={"host": host}),
        await client.post("/v1/embeddings", json=EMBED, headers={"host": host}),
    ):
        assert _code(reply, 400) == "invalid_host"


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "a.localhost"])
async def test_local_names_pass_on_loopback(serve: Serve, host: str) -> None:
    client = await serve()
    assert (await client.get("/v1/models", headers={"host": host})).status_code == 200


async def test_configured_hosts(serve: Serve) -> None:
    named = await serve(security=SecuritySettings(allowed_hosts="embed.example.com,.internal"))
    for host, status in [
        ("embed.example.com", 200),
        ("EMBED.example.com:443", 200),
        ("a.b.internal", 200),
        ("internal", 200),
        ("localhost", 400),
        ("example.com", 400),
    ]:
        assert (await named.get("/v1/models", headers={"host": host})).status_code == status, host
    # Bound to every interface with nothing configured: any Host (a LAN name, an address).
    everywhere = await serve(host="0.0.0.0")
    assert (await everywhere.get("/v1/models", headers={"host": "box.lan"})).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
    ],
)
async def test_a_post_from_another_site_is_refused(serve: Serve, headers: dict[str, str]) -> None:
    client = await serve()
    assert _code(await client.post("/v1/embeddings", json=EMBED, headers=headers), 403)
    # Bound to every interface, a foreign Origin is refused all the same.
    everywhere = await serve(host="0.0.0.0")
    assert _code(await everywhere.post("/v1/embeddings", json=EMBED, headers=headers), 403)


async def test_the_same_origin_may_post(serve: Serve) -> None:
    client = await serve()
    same = {"origin": "http://localhost:8000", "sec-fetch-site": "same-origin"}
    assert (await client.post("/v1/embeddings", json=EMBED, headers=same)).status_code == 200


async def test_too_many_headers(serve: Serve) -> None:
    client = await serve(http=HttpSettings(max_headers=20))
    many = {f"x-extra-{i}": "1" for i in range(30)}
    assert _code(await client.get("/health", headers=many), 431) == "too_many_headers"
    assert (await client.get("/health")).status_code == 200


def test_default_hosts() -> None:
    assert (
        allowed_hosts("", "127.0.0.1") == allowed_hosts("", "::1") == allowed_hosts("", "localhost")
    )
    assert allowed_hosts("", "0.0.0.0") == ("*",)
    rule = HostRule(allowed_hosts("", "127.0.0.1"))
    assert rule.allows("localhost") and not rule.allows("localhost.evil.example")
    assert not rule.allows("") and not rule.allows("[bad")
