"""API keys and rate limits on two real server processes sharing one real Redis.

Replica ``a`` fails open when Redis is gone, replica ``b`` fails closed; while Redis is up they
hold one budget per key between them, on Redis's clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from embedpipe.auth import hash_key
from tests.integration.conftest import MODEL
from tests.redis_server import RedisServer, find_redis_server
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.redis]

RPM = 10
TPM = 100_000
# Each test uses its own keys, so each starts with whole budgets.
KEYS = {
    "interleaved": "ep-interleaved-0000000000000000",
    "own-budget": "ep-own-budget-00000000000000000",
    "tokens": "ep-tokens-00000000000000000000000",  # rpm 3, tpm 60 in the keys file
    "outage": "ep-outage-00000000000000000000000",
}
HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


class Replicas:
    def __init__(self, redis: RedisServer, a: ServerProcess, b: ServerProcess) -> None:
        self.redis = redis
        self.a = a
        self.b = b


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    if find_redis_server() is None:
        pytest.fail("redis-server is missing: `make test` installs it")
    root = tmp_path_factory.mktemp("ratelimit")
    keys_file = root / "keys.toml"
    entries = []
    for name, key in KEYS.items():
        entries.append(f'[[keys]]\nname = "{name}"\nhash = "{hash_key(key)}"\n')
        if name == "tokens":
            entries[-1] += "rpm = 3\ntpm = 60\n"
    keys_file.write_text("\n".join(entries))
    # Its own Redis: this module stops it.
    with RedisServer.start_new(root / "redis") as redis:
        env = {
            "EMBEDPIPE_REDIS_URL": redis.url,
            "EMBEDPIPE_DATA_DIR": str(root / "data"),
            "EMBEDPIPE_CACHE__NAMESPACE": f"ratelimit{redis.port}",
            "EMBEDPIPE_API_KEYS_FILE": str(keys_file),
            "EMBEDPIPE_RATE_LIMIT_RPM": str(RPM),
            "EMBEDPIPE_RATE_LIMIT_TPM": str(TPM),
            "EMBEDPIPE_SECURITY__RETRY_SECONDS": "0.5",
            # A busy test machine must not turn a slow connect into fail-open (Redis is
            # stopped, not hung, in the outage test: refusals are immediate either way).
            "EMBEDPIPE_SECURITY__REDIS_SOCKET_TIMEOUT": "2",
            "EMBEDPIPE_SECURITY__REDIS_CONNECT_TIMEOUT": "2",
        }
        a = ServerProcess(env, root / "a.log").start()
        b = ServerProcess({**env, "EMBEDPIPE_SECURITY__FAIL_CLOSED": "true"}, root / "b.log")
        b.start()
        try:
            yield Replicas(redis, a, b)
        finally:
            a.stop()
            b.stop()


def _post(
    server: ServerProcess, key: str | None, text: str = "hello world", path: str = "/v1/embeddings"
) -> httpx.Response:
    body = {"model": MODEL, "input": text} if path == "/v1/embeddings" else {"text": text}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)


def test_two_replicas_hold_one_budget(replicas: Replicas) -> None:
    """RPM=10: of 16 requests sent at once, alternately to each replica, exactly 10 pass."""
    key = KEYS["interleaved"]
    refused_before = replicas.a.metric("embedpipe_rate_limited_total", limit="requests")
    servers = [replicas.a, replicas.b] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda s: _post(s, key, f"interleaved {id(s)}"), servers))
    passed = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert (len(passed), len(refused)) == (10, 6), [r.status_code for r in replies]
    # Both replicas served some and refused some: the budget is shared, not per process.
    assert {r.url.port for r in passed} == {replicas.a.port, replicas.b.port}
    # Each pass saw the shared counter at a different point.
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in passed)
    assert remaining == list(range(RPM))
    for reply in passed:
        assert all(name in reply.headers for name in HEADERS)
        assert reply.headers["x-ratelimit-limit-requests"] == str(RPM)
        assert reply.headers["x-ratelimit-limit-tokens"] == str(TPM)
    for reply in refused:
        assert all(name in reply.headers for name in HEADERS)
        assert reply.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(reply.headers["retry-after"]) <= 60
        assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert "interleaved" in error["message"] and key not in reply.text
    # Tokens were charged only for what passed: exactly what `usage` reported.
    used = sum(r.json()["usage"]["total_tokens"] for r in passed)
    assert min(int(r.headers["x-ratelimit-remaining-tokens"]) for r in refused) == TPM - used
    refused_after = replicas.a.metric(
        "embedpipe_rate_limited_total", limit="requests"
    ) + replicas.b.metric("embedpipe_rate_limited_total", limit="requests")
    assert refused_after >= refused_before + 6


def test_a_keys_budget_is_its_own(replicas: Replicas) -> None:
    # The key of the test above is spent; this one is whole, on either replica.
    assert _post(replicas.a, KEYS["interleaved"]).status_code == 429
    first = _post(replicas.b, KEYS["own-budget"], path="/embed")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-requests"] == str(RPM - 1)
    second = _post(replicas.a, KEYS["own-budget"])
    assert second.status_code == 200
    assert second.headers["x-ratelimit-remaining-requests"] == str(RPM - 2)


def test_tokens_per_minute(replicas: Replicas) -> None:
    """The key ``tokens`` has rpm 3 and tpm 60 of its own."""
    key = KEYS["tokens"]
    text = " ".join(["word"] * 20)
    first = _post(replicas.a, key, text)
    assert first.status_code == 200
    tokens = first.json()["usage"]["total_tokens"]
    assert 20 < tokens < 30  # counted with the model's tokenizer, specials included
    assert first.headers["x-ratelimit-limit-tokens"] == "60"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(60 - tokens)
    second = _post(replicas.b, key, text)
    assert second.status_code == 200
    assert second.headers["x-ratelimit-remaining-tokens"] == str(60 - 2 * tokens)
    # More tokens than the budget holds can never be served: 400, not an endless 429. Like
    # every request it paid its slot (and one token) before it was tokenized.
    never = _post(replicas.a, key, " ".join(["word"] * 80))
    assert never.status_code == 400
    assert never.json()["error"]["code"] == "tokens_exceed_rate_limit"
    # A fourth is over the request budget: refused before its body is read, on either replica.
    fourth = _post(replicas.b, key, text)
    assert fourth.status_code == 429
    assert fourth.headers["x-ratelimit-remaining-requests"] == "0"
    assert fourth.headers["x-ratelimit-remaining-tokens"] == str(60 - 2 * tokens - 1)
    assert "requests per minute" in fourth.json()["error"]["message"]


def test_keys_on_a_real_server(replicas: Replicas) -> None:
    url = replicas.a.url
    body = {"model": MODEL, "input": "x"}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": "wrong"},
        {"Authorization": f"Basic {KEYS['own-budget']}"},
    ):
        reply = httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=10)
        assert reply.status_code == 401
        assert reply.json()["error"]["type"] == "authentication_error"
        assert reply.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/models", "/v1/models/x", "/stats", "/v1/files", "/v1/batches", "/nope"):
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 401, path
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 200, path
    listed = httpx.get(f"{url}/v1/models", headers={"X-API-Key": KEYS["outage"]}, timeout=10)
    assert listed.status_code == 200
    for key in KEYS.values():
        assert key not in replicas.a.logs()


def test_redis_down_fails_open_or_closed_as_configured(replicas: Replicas) -> None:
    key = KEYS["outage"]
    errors_before = replicas.a.metric("embedpipe_rate_limiter_errors_total")
    assert _post(replicas.a, key).status_code == 200
    replicas.redis.stop()
    try:
        for _ in range(3):
            open_reply = _post(replicas.a, key, "served while the limiter is down")
            assert open_reply.status_code == 200
            assert "x-ratelimit-remaining-requests" not in open_reply.headers
            closed = _post(replicas.b, key, "refused while the limiter is down")
            assert closed.status_code == 503
            assert closed.json()["error"]["code"] == "rate_limiter_unavailable"
            assert closed.headers["retry-after"] == "1"
        assert replicas.a.metric("embedpipe_rate_limiter_errors_total") >= errors_before + 3
        assert "failing open" in replicas.a.logs()
        assert "failing closed" in replicas.b.logs()
    finally:
        replicas.redis.start()
    # Back (an empty Redis: whole budgets), enforced again on both, by themselves.
    for server in (replicas.a, replicas.b):
        for _ in range(40):
            reply = _post(server, key, "after the outage")
            if reply.status_code == 200 and "x-ratelimit-remaining-requests" in reply.headers:
                break
            time.sleep(0.25)
        else:
            raise AssertionError(f"limits were not enforced again: {reply.status_code}")


def test_logs_never_hold_a_key(replicas: Replicas) -> None:
    for server in (replicas.a, replicas.b):
        text = server.log_path.read_text(errors="replace")
        assert all(key not in text for key in KEYS.values())
