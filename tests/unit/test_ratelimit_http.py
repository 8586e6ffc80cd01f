"""Rate limits over HTTP, on the real application with a fake model and the memory storage:
budgets per client address (auth off) or per key, headers on every answer, 429, the never-fits
400, and a limiter that fails closed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedpipe.auth import hash_key
from embedpipe.ratelimit import LimiterUnavailable, Quota, RateLimiter
from embedpipe.runtime import Runtime
from embedpipe.settings import SecuritySettings, Settings
from tests.fakes import fake_app

Serve = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """``await serve(peer=..., **settings)`` -> a client of the app over a fake model."""
    opened: list[tuple[Runtime, httpx.AsyncClient]] = []

    async def start(peer: str = "192.0.2.1", **overrides: Any) -> httpx.AsyncClient:
        app, runtime = fake_app(Settings(data_dir=tmp_path / "data", **overrides))
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        client = httpx.AsyncClient(transport=transport, base_url="http://localhost")
        opened.append((runtime, client))
        return client

    yield start
    for runtime, client in opened:
        await client.aclose()
        await runtime.close()


def _embedding(text: str = "one two three") -> dict[str, object]:
    return {"model": "fake", "input": text}


async def test_budgets_per_address_with_headers_on_every_answer(serve: Serve) -> None:
    client = await serve(rate_limit_rpm=3, rate_limit_tpm=1000)
    replies = [await client.post("/v1/embeddings", json=_embedding()) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    tokens = replies[0].json()["usage"]["total_tokens"]  # the fake counts words + 2
    assert tokens == 5
    for used, reply in enumerate(replies[:3], start=1):
        assert reply.headers["x-ratelimit-limit-requests"] == "3"
        assert reply.headers["x-ratelimit-remaining-requests"] == str(3 - used)
        assert reply.headers["x-ratelimit-limit-tokens"] == "1000"
        assert reply.headers["x-ratelimit-remaining-tokens"] == str(1000 - used * tokens)
        assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "retry-after" not in reply.headers
    refused = replies[3]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "192.0.2.1" in refused.json()["error"]["message"]
    assert 55 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(1000 - 3 * tokens)
    # The simple API draws on the same budget (other addresses: see the proxy test).
    assert (await client.post("/embed", json={"text": "x"})).status_code == 429


async def test_the_simple_api_is_charged_its_tokens(serve: Serve) -> None:
    client = await serve(rate_limit_tpm=20)
    one = await client.post("/embed", json={"text": "a b c"})
    assert one.status_code == 200 and one.headers["x-ratelimit-remaining-tokens"] == "15"
    batch = await client.post("/embed/batch", json={"texts": ["a", "b c"]})
    assert batch.status_code == 200 and batch.headers["x-ratelimit-remaining-tokens"] == "8"
    assert "x-ratelimit-limit-requests" not in batch.headers  # no RPM set
    refused = await client.post("/embed/batch", json={"texts": ["a b c d e f g"]})
    assert refused.status_code == 429
    # Its request paid one token up front, before its texts were tokenized; no more.
    assert refused.headers["x-ratelimit-remaining-tokens"] == "7"


async def test_a_request_that_can_never_fit_is_a_400(serve: Serve) -> None:
    client = await serve(rate_limit_rpm=5, rate_limit_tpm=10)
    for path, body, param in [
        ("/v1/embeddings", _embedding("a b c d e f g h i"), "input"),
        ("/embed", {"text": "a b c d e f g h i"}, "text"),
        ("/embed/batch", {"texts": ["a b c d", "e f g h"]}, "texts"),
    ]:
        reply = await client.post(path, json=body)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert (error["param"], error["code"]) == (param, "tokens_exceed_rate_limit")
        assert "11 tokens" in error["message"] or "12 tokens" in error["message"]
        assert "never" in error["message"]
    # Each paid its request slot (and one token) before it was tokenized: tokenizing costs
    # CPU, so a client cannot make the server tokenize for free.
    ok = await client.post("/embed", json={"text": "a"})
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"


async def test_every_request_pays_its_slot_before_its_body_is_read(serve: Serve) -> None:
    client = await serve(rate_limit_rpm=2)
    assert (await client.post("/v1/embeddings", json=_embedding(""))).status_code == 400
    assert (await client.post("/embed", json={"text": "x", "model": "no"})).status_code == 404
    # Over budget: refused before its body is parsed (this one is not even JSON).
    refused = await client.post(
        "/embed", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert refused.status_code == 429, refused.text


async def test_forwarded_for_from_a_trusted_proxy_separates_clients(serve: Serve) -> None:
    proxy = SecuritySettings(trusted_proxies="10.0.0.0/8")
    client = await serve(peer="10.1.2.3", rate_limit_rpm=1, security=proxy)
    behind = {"X-Forwarded-For": "198.51.100.7"}
    assert (await client.post("/embed", json={"text": "x"}, headers=behind)).status_code == 200
    assert (await client.post("/embed", json={"text": "x"}, headers=behind)).status_code == 429
    other = {"X-Forwarded-For": "198.51.100.7, 198.51.100.8"}  # a spoofed first hop
    assert (await client.post("/embed", json={"text": "x"}, headers=other)).status_code == 200
    # Without a trusted proxy the header is ignored: every caller is the peer itself.
    direct = await serve(peer="203.0.113.5", rate_limit_rpm=1)
    assert (await direct.post("/embed", json={"text": "x"}, headers=behind)).status_code == 200
    assert (await direct.post("/embed", json={"text": "x"}, headers=other)).status_code == 429


async def test_keys_have_their_own_budgets_and_limits(serve: Serve, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "small"\nhash = "{hash_key("k-small")}"\nrpm = 1\n'
        f'[[keys]]\nname = "free"\nhash = "{hash_key("k-free")}"\nrpm = 0\ntpm = 0\n'
    )
    client = await serve(api_keys="k-default", api_keys_file=keys, rate_limit_rpm=2)

    async def post(key: str) -> httpx.Response:
        return await client.post("/embed", json={"text": "x"}, headers={"X-API-Key": key})

    assert [(await post("k-small")).status_code for _ in range(2)] == [200, 429]
    assert "small" in (await post("k-small")).json()["error"]["message"]
    assert [(await post("k-default")).status_code for _ in range(3)] == [200, 200, 429]
    free = [await post("k-free") for _ in range(5)]
    assert {r.status_code for r in free} == {200}
    assert not any(h.startswith("x-ratelimit") for h in free[0].headers)


async def test_a_limiter_that_fails_closed_answers_503(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await serve(rate_limit_rpm=5)

    async def broken(self: RateLimiter, client: str, quota: Quota, tokens: int) -> None:
        raise LimiterUnavailable("down")

    monkeypatch.setattr(RateLimiter, "acquire", broken)
    reply = await client.post("/embed", json={"text": "x"})
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "rate_limiter_unavailable"
    assert reply.headers["retry-after"] == "1"


async def test_rerank_routes_are_charged_the_tokens_of_what_the_model_sees(serve: Serve) -> None:
    """By cosine (the fake model): the query's tokens and each document's, as ``usage``."""
    client = await serve(rate_limit_tpm=30)
    body = {"model": "fake", "query": "a b", "documents": ["c", "d e"]}
    ranked = await client.post("/v1/rerank", json=body)
    assert ranked.status_code == 200, ranked.text
    assert ranked.json()["usage"]["total_tokens"] == 4 + 3 + 4  # the fake counts words + 2
    assert ranked.headers["x-ratelimit-remaining-tokens"] == "19"
    tei = await client.post("/rerank", json={"model": "fake", "query": "a", "texts": ["b"]})
    assert tei.status_code == 200 and tei.headers["x-ratelimit-remaining-tokens"] == "13"
    refused = await client.post("/v2/rerank", json={**body, "documents": ["x y z w"] * 3})
    assert refused.status_code == 429 and set(refused.json()) == {"id", "message"}
    assert "retry-after" in refused.headers
