"""embedpipe in front of an OpenAI-compatible upstream, over real HTTP through the openai SDK.

The upstream is a second embedpipe process with the bundled model, its own API key (with a
per-key rate limit) and its own cache. The proxy serves that model as ``up`` (the ``openai``
backend) beside its own local copy of it, so one process shows both side by side. The upstream
is killed once (outage, breaker, recovery) and restarted on the same port. The tests run in
file order against these processes; the rate-limit test comes after every test that needs the
proxy's budget at the upstream, because it spends it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedpipe.auth import hash_key
from embedpipe.upstream.model import Cl100kCounter
from tests.integration.conftest import MODEL, assert_same_vectors, reference_vectors
from tests.integration.test_dashboard import _chromium
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

PROXY_KEY = "ep-upstream-proxy-" + "k3y" * 10
WRONG_KEY = "ep-upstream-wrong-" + "n0pe" * 8
STINGY_KEY = "ep-upstream-stingy-" + "f0ur" * 8  # 4 requests a minute at the upstream
UP = "up"  # the proxy's name for the upstream model
PRICE = 0.5  # dollars per million tokens, so that savings show in a few decimals
PROXY_RPM = 60  # the proxy's budget at the upstream, per minute
DEADLINE = 20.0
BREAKER_RESET = 2.0
EMBED_ROUTE = {"route": "/v1/embeddings", "method": "POST", "status": "200"}


@dataclass
class Stack:
    upstream: ServerProcess
    proxy: ServerProcess
    root: Path

    def upstream_calls(self) -> float:
        """Embedding requests the upstream answered with 200."""
        return self.upstream.metric("embedpipe_http_requests_total", **EMBED_ROUTE)

    def proxy_calls(self, status: str = "200") -> float:
        return self.proxy.metric("embedpipe_upstream_requests_total", model=UP, status=status)


def _upstream(root: Path, port: int | None = None) -> ServerProcess:
    keys = root / "upstream-keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "proxy"\nhash = "{hash_key(PROXY_KEY)}"\nrpm = {PROXY_RPM}\n'
        f'[[keys]]\nname = "stingy"\nhash = "{hash_key(STINGY_KEY)}"\nrpm = 4\n'
    )
    return ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(root / "upstream-data"),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_API_KEYS_FILE": str(keys),
        },
        root / "upstream.log",
        port=port,
    )


def _proxy_env(root: Path, name: str, upstream: ServerProcess, key: str) -> dict[str, str]:
    return {
        "EMBEDPIPE_DATA_DIR": str(root / f"{name}-data"),
        "EMBEDPIPE_REDIS_URL": "",
        "EMBEDPIPE_OPENAI_BASE_URL": f"{upstream.url}/v1",
        "EMBEDPIPE_OPENAI_API_KEY": key,
        "EMBEDPIPE_OPENAI_PRICE_PER_MILLION_TOKENS": str(PRICE),
        "EMBEDPIPE_UPSTREAM__DEADLINE_SECONDS": str(DEADLINE),
        "EMBEDPIPE_UPSTREAM__RETRY_BASE_SECONDS": "0.1",
        "EMBEDPIPE_UPSTREAM__BREAKER_FAILURES": "3",
        "EMBEDPIPE_UPSTREAM__BREAKER_RESET_SECONDS": str(BREAKER_RESET),
        # Debug logs too must never hold the key.
        "EMBEDPIPE_LOG_LEVEL": "debug",
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("upstream")
    upstream = _upstream(root)
    proxy = ServerProcess(
        {
            **_proxy_env(root, "proxy", upstream, PROXY_KEY),
            # The bundled model locally, and the same model through the upstream as `up`.
            "EMBEDPIPE_EXTRA_MODELS": f"{UP}=openai:{MODEL}",
            "EMBEDPIPE_UPSTREAM__MAX_INPUTS_PER_CALL": "512",
            # The upstream computes on one thread: more calls at once only queue there.
            "EMBEDPIPE_UPSTREAM__CONCURRENCY": "2",
            "EMBEDPIPE_LIMITS__MAX_INPUTS": "4096",
        },
        root / "proxy.log",
    )
    # The proxy does not need its upstream to start: both load at once.
    with ThreadPoolExecutor(2) as pool:
        for started in [pool.submit(server.start) for server in (upstream, proxy)]:
            started.result()
    stack = Stack(upstream, proxy, root)
    yield stack
    stack.proxy.stop()
    stack.upstream.stop()


def _embed(server: ServerProcess, model: str, texts: list[str], **extra: Any) -> httpx.Response:
    body = {"model": model, "input": texts, **extra}
    return httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=120)


def _vectors(reply: httpx.Response) -> np.ndarray:
    assert reply.status_code == 200, reply.text
    return np.array([item["embedding"] for item in reply.json()["data"]], dtype=np.float32)


def _assert_envelope(reply: httpx.Response, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _normalised_prefix(vectors: np.ndarray, size: int) -> np.ndarray:
    prefix = vectors[:, :size]
    result: np.ndarray = prefix / np.linalg.norm(prefix, axis=1, keepdims=True)
    return result


def test_upstream_vectors_are_the_upstreams_and_the_models(
    stack: Stack, reference_model: Any
) -> None:
    texts = ["an upstream vector", "another one, a little longer than the first", "a third"]
    through_proxy = _vectors(_embed(stack.proxy, UP, texts))
    direct = _vectors(
        httpx.post(
            f"{stack.upstream.url}/v1/embeddings",
            json={"model": MODEL, "input": texts},
            headers={"Authorization": f"Bearer {PROXY_KEY}"},
            timeout=60,
        )
    )
    np.testing.assert_allclose(through_proxy, direct, atol=1e-6)
    assert_same_vectors(through_proxy, reference_vectors(reference_model, texts))


def test_cached_text_makes_no_upstream_call_and_counts_what_it_saved(stack: Stack) -> None:
    texts = ["cache me once", "cache me twice", "cache me once"]
    first = _embed(stack.proxy, UP, texts)
    assert first.status_code == 200
    tokens = first.json()["usage"]["prompt_tokens"]
    assert tokens == sum(Cl100kCounter().count(texts))  # cl100k, as OpenAI counts
    upstream_before, proxy_before = stack.upstream_calls(), stack.proxy_calls()
    saved_before = stack.proxy.metric("embedpipe_upstream_tokens_saved_total", model=UP)
    cost_before = stack.proxy.metric("embedpipe_upstream_cost_saved_dollars_total", model=UP)

    again = _embed(stack.proxy, UP, texts)
    np.testing.assert_array_equal(_vectors(again), _vectors(first))
    assert stack.upstream_calls() == upstream_before and stack.proxy_calls() == proxy_before
    saved = stack.proxy.metric("embedpipe_upstream_tokens_saved_total", model=UP)
    cost = stack.proxy.metric("embedpipe_upstream_cost_saved_dollars_total", model=UP)
    assert saved - saved_before == tokens
    assert math.isclose(cost - cost_before, tokens * PRICE / 1e6, rel_tol=1e-6)

    stats = httpx.get(f"{stack.proxy.url}/stats", timeout=10).json()
    upstream = stats["upstream"][UP]
    assert upstream["tokens_saved"] >= tokens and upstream["cost_saved_dollars"] > 0
    assert upstream["tokens"] > 0 and upstream["requests"]["200"] >= 1
    assert set(stats["upstream"]) == {UP}  # the local model is not an upstream one


def test_a_3000_input_request_is_split_into_upstream_calls(
    stack: Stack, reference_model: Any
) -> None:
    texts = [f"split request text number {i}" for i in range(3000)]
    upstream_before, proxy_before = stack.upstream_calls(), stack.proxy_calls()
    vectors = _vectors(_embed(stack.proxy, UP, texts))
    assert vectors.shape == (3000, 384)
    # 512 inputs per call: 5 full calls and one of 440.
    assert stack.proxy_calls() - proxy_before == 6
    assert stack.upstream_calls() - upstream_before == 6
    sample = [0, 511, 512, 1500, 2047, 2999]
    assert_same_vectors(
        vectors[sample], reference_vectors(reference_model, [texts[i] for i in sample])
    )


def test_dimensions_are_computed_upstream_and_cached_per_size(
    stack: Stack, reference_model: Any
) -> None:
    text = ["a text asked for at several sizes"]
    full = reference_vectors(reference_model, text)
    before = stack.proxy_calls()
    small = _vectors(_embed(stack.proxy, UP, text, dimensions=128))
    assert small.shape == (1, 128) and stack.proxy_calls() - before == 1
    assert_same_vectors(small, _normalised_prefix(full, 128))
    # The same size again comes from the cache; another size is another upstream call.
    np.testing.assert_array_equal(_vectors(_embed(stack.proxy, UP, text, dimensions=128)), small)
    assert stack.proxy_calls() - before == 1
    smaller = _vectors(_embed(stack.proxy, UP, text, dimensions=64))
    assert smaller.shape == (1, 64) and stack.proxy_calls() - before == 2
    assert_same_vectors(smaller, _normalised_prefix(full, 64))
    bad = _embed(stack.proxy, UP, text, dimensions=1000)
    assert bad.status_code == 400
    _assert_envelope(bad)


def test_a_local_and_an_upstream_model_side_by_side(stack: Stack) -> None:
    texts = ["served here and there", "twice the same model"]
    local = _vectors(_embed(stack.proxy, MODEL, texts))
    upstream = _vectors(_embed(stack.proxy, UP, texts))
    assert_same_vectors(upstream, local)
    listed = httpx.get(f"{stack.proxy.url}/v1/models", timeout=10).json()
    assert {model["id"] for model in listed["data"]} == {MODEL, UP}
    models = {
        model["name"]: model for model in httpx.get(f"{stack.proxy.url}/stats").json()["models"]
    }
    assert models[UP]["upstream"] and models[UP]["backend"] == "openai"
    assert models[UP]["dimensions"] == 384  # learned from the first answer
    assert not models[MODEL]["upstream"]


@pytest.mark.browser
def test_the_dashboard_shows_what_the_upstream_billed_and_the_cache_saved(
    stack: Stack, tmp_path: Path
) -> None:
    dom = _chromium(tmp_path / "profile", "--dump-dom", f"{stack.proxy.url}/dashboard")
    assert 'data-state="live"' in dom, dom[:2000]
    table = re.search(r'<tbody id="upstream">(.*?)</tbody>', dom, re.S)
    assert table is not None
    cells = re.findall(r"<td>([^<]*)</td>", table.group(1))
    assert cells[0] == UP and cells[-1] == "closed"
    assert int(cells[5]) > 0 and float(cells[6].lstrip("$")) > 0  # tokens and dollars saved


def test_an_outage_answers_502_503_while_cached_text_flows_then_recovers(stack: Stack) -> None:
    cached = ["cached before the outage"]
    assert _embed(stack.proxy, UP, cached).status_code == 200
    port = stack.upstream.port
    assert stack.upstream.process is not None
    stack.upstream.process.kill()
    stack.upstream.process.wait()

    started = time.monotonic()
    down = _embed(stack.proxy, UP, ["nobody has embedded this yet"])
    assert down.status_code in (502, 503), down.text
    assert time.monotonic() - started < DEADLINE + 5
    _assert_envelope(down)
    # Refused connections opened the breaker: calls now fail fast with 503 and Retry-After.
    breaker = _embed(stack.proxy, UP, ["nor this"])
    assert breaker.status_code == 503
    _assert_envelope(breaker, "upstream_unavailable")
    assert int(breaker.headers["Retry-After"]) >= 1
    assert stack.proxy.metric("embedpipe_upstream_breaker_open", model=UP) == 1
    # Cached text and the local model keep flowing; the proxy stays in rotation, degraded.
    assert _embed(stack.proxy, UP, cached).status_code == 200
    assert _embed(stack.proxy, MODEL, ["the local model does not care"]).status_code == 200
    ready = httpx.get(f"{stack.proxy.url}/ready", timeout=10)
    assert ready.status_code == 200 and f"upstream:{UP}" in ready.json()["degraded"]
    assert httpx.get(f"{stack.proxy.url}/stats").json()["upstream"][UP]["breaker_open"]

    stack.upstream = _upstream(stack.root, port=port).start()
    time.sleep(BREAKER_RESET)  # then one probe may go
    back = _embed(stack.proxy, UP, ["nobody has embedded this yet"])
    assert back.status_code == 200, back.text
    assert stack.proxy.metric("embedpipe_upstream_breaker_open", model=UP) == 0
    assert httpx.get(f"{stack.proxy.url}/ready", timeout=10).json()["degraded"] == []


def _spend_the_proxys_budget(upstream: ServerProcess) -> float:
    """Call the upstream with the proxy's key until it refuses (as other clients of the same
    key would); returns the seconds left in the upstream's window."""
    for _ in range(PROXY_RPM + 1):
        direct = httpx.post(
            f"{upstream.url}/v1/embeddings",
            json={"model": MODEL, "input": "spend the budget"},
            headers={"Authorization": f"Bearer {PROXY_KEY}"},
            timeout=30,
        )
        if direct.status_code == 429:
            return int(direct.headers["retry-after-ms"]) / 1000
    raise AssertionError("the upstream never rate limited the proxy")


def test_an_upstream_429_past_the_deadline_is_a_429_at_once(stack: Stack) -> None:
    window_left = _spend_the_proxys_budget(stack.upstream)
    if window_left < DEADLINE + 2:
        # A window ending within the deadline would be waited for (the unit tests cover
        # that): start a fresh one, whose end is past the deadline.
        time.sleep(window_left + 0.5)
        window_left = _spend_the_proxys_budget(stack.upstream)
    limited_before = stack.proxy_calls("429")
    started = time.monotonic()
    reply = _embed(stack.proxy, UP, ["a text while the upstream says slow down"])
    elapsed = time.monotonic() - started
    assert reply.status_code == 429, reply.text
    _assert_envelope(reply, "upstream_rate_limited")
    # The upstream's own Retry-After, passed on; no waiting for a window past the deadline
    # and no hammering: exactly one attempt.
    assert abs(int(reply.headers["Retry-After"]) - window_left) <= elapsed + 2
    assert stack.proxy_calls("429") - limited_before == 1
    assert elapsed < DEADLINE / 2


def test_an_upstream_allowing_4_a_minute_gives_4_answers_then_quick_429s(stack: Stack) -> None:
    # Acceptance, with default upstream settings: request 5 used to wait out the upstream's
    # ~60 s Retry-After inside the 60 s deadline, then answer 502 upstream_timeout.
    stingy = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(stack.root / "stingy-data"),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_BACKEND": "openai",
            "EMBEDPIPE_MODEL": MODEL,
            "EMBEDPIPE_OPENAI_BASE_URL": f"{stack.upstream.url}/v1",
            "EMBEDPIPE_OPENAI_API_KEY": STINGY_KEY,
        },
        stack.root / "stingy.log",
    ).start()
    try:
        replies, seconds = [], []
        for i in range(8):
            started = time.monotonic()
            replies.append(_embed(stingy, MODEL, [f"stingy request {i}"]))
            seconds.append(time.monotonic() - started)
    finally:
        stingy.stop()
    assert [reply.status_code for reply in replies] == [200] * 4 + [429] * 4, [
        reply.text for reply in replies
    ]
    for reply, took in zip(replies[4:], seconds[4:], strict=True):
        _assert_envelope(reply, "upstream_rate_limited")
        # The upstream's window (about a minute) passed on in both forms, at once.
        assert 30 <= int(reply.headers["Retry-After"]) <= 61
        assert (
            abs(int(reply.headers["retry-after-ms"]) / 1000 - int(reply.headers["Retry-After"]))
            <= 1
        )
        assert took < 3.0, seconds  # a generous bound on what used to be a 60 s hang


def test_rejected_credentials_are_a_502_and_the_key_is_never_shown(stack: Stack) -> None:
    # An upstream-only process (EMBEDPIPE_BACKEND=openai) with a key the upstream refuses.
    wrong = ServerProcess(
        {
            **_proxy_env(stack.root, "wrong", stack.upstream, WRONG_KEY),
            "EMBEDPIPE_BACKEND": "openai",
            "EMBEDPIPE_MODEL": MODEL,
        },
        stack.root / "wrong.log",
    ).start()
    try:
        reply = _embed(wrong, MODEL, ["who am I"])
    finally:
        wrong.stop()
    assert reply.status_code == 502
    error = _assert_envelope(reply, "upstream_auth_failed")
    assert "EMBEDPIPE_OPENAI_API_KEY" in error["message"]
    assert WRONG_KEY not in reply.text and WRONG_KEY[-12:] not in reply.text
    for log, key in ((wrong.log_path, WRONG_KEY), (stack.proxy.log_path, PROXY_KEY)):
        text = log.read_text(errors="replace")
        assert "upstream" in text  # the log is there and has upstream lines
        assert key not in text and key[-12:] not in text, log
