"""The upstream client's retry loop through the real ``openai`` SDK, against an in-memory
OpenAI-compatible endpoint (``httpx2.MockTransport``): statuses, Retry-After, deadline, breaker,
and the API key never repeated. Waits go to a fake clock, so nothing here sleeps."""

from __future__ import annotations

import email.utils
import time
import uuid

import httpx2
import numpy as np
import pytest
from prometheus_client import REGISTRY

from embedpipe.errors import InvalidInput, UpstreamFailed, UpstreamRateLimited, UpstreamUnavailable
from embedpipe.settings import UpstreamSettings
from embedpipe.upstream import UpstreamClient
from embedpipe.upstream.client import retry_after_seconds
from tests.fakes import FakeUpstream, vector_for

SECRET = "sk-test-" + "s3cr3t" * 6


class FakeTime:
    """A monotonic clock that only the client's waits move forward."""

    def __init__(self) -> None:
        self.now = 5000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _client(
    upstream: FakeUpstream, clock: FakeTime, **overrides: float
) -> tuple[UpstreamClient, str]:
    model = f"m-{uuid.uuid4().hex[:8]}"  # metric series of this test's own
    settings = UpstreamSettings(**{"deadline_seconds": 30.0, "breaker_failures": 50, **overrides})
    client = UpstreamClient(
        model,
        "text-embedding-3-small",
        upstream.sdk(api_key=SECRET),
        settings,
        secret=SECRET,
        sleep=clock.sleep,
        clock=clock,
    )
    return client, model


def _requests(model: str, status: str) -> float:
    value = REGISTRY.get_sample_value(
        "embedpipe_upstream_requests_total", {"model": model, "status": status}
    )
    return value or 0.0


async def test_an_answer_is_decoded_in_input_order_and_its_usage_billed() -> None:
    upstream, clock = FakeUpstream(dimensions=8), FakeTime()
    client, model = _client(upstream, clock)
    answer = await client.embed(["one two", "three"], dimensions=None, counted_tokens=99)
    await client.close()
    np.testing.assert_array_equal(
        answer.vectors, np.stack([vector_for("one two"), vector_for("three")])
    )
    assert answer.billed_tokens == 3  # the upstream's usage, not our count
    body = upstream.bodies[0]
    assert body["model"] == "text-embedding-3-small" and body["encoding_format"] == "base64"
    assert "dimensions" not in body
    assert upstream.headers[0]["authorization"] == f"Bearer {SECRET}"
    assert _requests(model, "200") == 1
    tokens = REGISTRY.get_sample_value("embedpipe_upstream_tokens_total", {"model": model})
    assert tokens == 3


async def test_dimensions_are_sent_upstream_when_asked() -> None:
    upstream, clock = FakeUpstream(dimensions=8), FakeTime()
    client, _ = _client(upstream, clock)
    answer = await client.embed(["text"], dimensions=4)
    await client.close()
    assert upstream.bodies[0]["dimensions"] == 4
    np.testing.assert_array_equal(answer.vectors[0], vector_for("text", 4))


async def test_5xx_are_retried_with_full_jitter_backoff() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.script += [(500, {}), (502, {}), (503, {})]
    client, model = _client(upstream, clock, retry_base_seconds=0.5, retry_max_seconds=1.5)
    answer = await client.embed(["text"], dimensions=None)
    await client.close()
    assert answer.vectors.shape == (1, 8) and len(upstream.bodies) == 4
    # Attempt n waits uniformly in [0, min(max, base * 2**n)].
    assert len(clock.sleeps) == 3
    for wait, bound in zip(clock.sleeps, (0.5, 1.0, 1.5), strict=True):
        assert 0 <= wait <= bound
    assert [_requests(model, status) for status in ("500", "502", "503", "200")] == [1, 1, 1, 1]
    retries = REGISTRY.get_sample_value("embedpipe_upstream_retries_total", {"model": model})
    assert retries == 3


async def test_a_429_waits_what_retry_after_ms_says() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.script.append((429, {"retry-after-ms": "1500", "retry-after": "2"}))
    client, _ = _client(upstream, clock, retry_base_seconds=0.25)
    await client.embed(["text"], dimensions=None)
    await client.close()
    assert len(clock.sleeps) == 1 and 1.5 <= clock.sleeps[0] <= 1.75


async def test_a_429_past_the_deadline_answers_429_with_the_upstreams_retry_after() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.script.append((429, {"retry-after": "120"}))
    client, _ = _client(upstream, clock, deadline_seconds=10.0)
    with pytest.raises(UpstreamRateLimited) as caught:
        await client.embed(["text"], dimensions=None)
    await client.close()
    assert caught.value.retry_after == 120
    assert len(upstream.bodies) == 1 and clock.sleeps == []  # no pointless wait, no hammering


async def test_a_long_429_is_answered_at_once_and_never_becomes_a_502() -> None:
    # Acceptance: an upstream allowing 4 requests a minute, default settings, 8 requests one
    # after another. Each upstream request takes 20 ms, so the 5th one's hint ends just inside
    # the 60 s deadline: waiting it out used to hang the caller a minute, then answer 502.
    upstream, clock = FakeUpstream(), FakeTime()

    def ticking() -> float:
        clock.now += 0.02
        return clock.now

    upstream.limit(4, 60.0, ticking)
    model = f"m-{uuid.uuid4().hex[:8]}"
    client = UpstreamClient(
        model, "m", upstream.sdk(), UpstreamSettings(), sleep=clock.sleep, clock=clock
    )
    answers: list[float | None] = []
    for _ in range(8):
        try:
            await client.embed(["text"], dimensions=None)
            answers.append(None)
        except UpstreamRateLimited as exc:
            answers.append(exc.retry_after)
    await client.close()
    assert answers[:4] == [None] * 4
    hints = answers[4:]
    assert all(hint is not None and 59 < hint <= 60 for hint in hints), hints
    assert clock.sleeps == [] and len(upstream.bodies) == 8  # no wait, one attempt each
    assert _requests(model, "429") == 4


async def test_a_short_429_is_waited_out_then_retried() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.script.append((429, {"retry-after": "5"}))  # max_retry_wait_seconds, inclusive
    client, _ = _client(upstream, clock, deadline_seconds=60.0)
    answer = await client.embed(["text"], dimensions=None)
    await client.close()
    assert answer.vectors.shape == (1, 8) and len(clock.sleeps) == 1 and clock.sleeps[0] >= 5


async def test_no_retry_goes_with_too_little_of_its_timeout_left() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    # The hint leaves 1.5 s of the deadline, under a quarter of the 8 s attempt timeout.
    upstream.script.append((503, {"retry-after": "8.5"}))
    client, _ = _client(
        upstream, clock, deadline_seconds=10.0, timeout_seconds=8.0, retry_base_seconds=0.01
    )
    with pytest.raises(UpstreamFailed) as caught:
        await client.embed(["text"], dimensions=None)
    await client.close()
    assert caught.value.code == "upstream_error" and len(upstream.bodies) == 1
    assert clock.sleeps == []


async def test_an_attempt_the_deadline_cut_short_leaves_the_last_real_answer() -> None:
    # Real time here: the second attempt stalls until the deadline ends it.
    upstream = FakeUpstream()
    upstream.script += [(503, {"retry-after-ms": "500"}), 30.0]
    settings = UpstreamSettings(
        deadline_seconds=1.0, timeout_seconds=0.8, retry_base_seconds=0.01, breaker_failures=50
    )
    client = UpstreamClient(f"m-{uuid.uuid4().hex[:8]}", "m", upstream.sdk(), settings)
    with pytest.raises(UpstreamFailed) as caught:
        await client.embed(["text"], dimensions=None)
    await client.close()
    assert len(upstream.bodies) == 2
    assert caught.value.code == "upstream_error" and "HTTP 503" in caught.value.message


async def test_failures_until_the_deadline_become_a_502() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.script += [(503, {})] * 100
    client, _ = _client(upstream, clock, deadline_seconds=3.0, retry_base_seconds=0.5)
    with pytest.raises(UpstreamFailed) as caught:
        await client.embed(["text"], dimensions=None)
    await client.close()
    assert caught.value.code == "upstream_error" and "HTTP 503" in caught.value.message
    assert sum(clock.sleeps) < 3.0 and len(upstream.bodies) >= 2


async def test_refused_connections_open_the_breaker_then_calls_fail_fast() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.script += [httpx2.ConnectError("refused")] * 3
    client, model = _client(upstream, clock, breaker_failures=3, breaker_reset_seconds=10.0)
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.embed(["text"], dimensions=None)
    assert caught.value.retry_after == 10.0
    assert _requests(model, "connection_error") == 3
    gauge = REGISTRY.get_sample_value("embedpipe_upstream_breaker_open", {"model": model})
    assert gauge == 1
    # Open: nothing is sent at all.
    with pytest.raises(UpstreamUnavailable):
        await client.embed(["other"], dimensions=None)
    assert len(upstream.bodies) == 3
    # After the reset period one probe goes; it succeeds and the breaker closes.
    clock.now += 10.0
    answer = await client.embed(["text"], dimensions=None)
    await client.close()
    assert answer.vectors.shape == (1, 8) and client.breaker.is_closed
    gauge = REGISTRY.get_sample_value("embedpipe_upstream_breaker_open", {"model": model})
    assert gauge == 0


async def test_rejected_credentials_are_a_502_that_never_repeats_the_key() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.error_message = f"Incorrect API key provided: {SECRET}"
    upstream.script.append((401, {}))
    client, _ = _client(upstream, clock)
    with pytest.raises(UpstreamFailed) as caught:
        await client.embed(["text"], dimensions=None)
    await client.close()
    assert caught.value.code == "upstream_auth_failed"
    assert "EMBEDPIPE_OPENAI_API_KEY" in caught.value.message
    assert SECRET not in caught.value.message and SECRET[:12] not in caught.value.message
    assert len(upstream.bodies) == 1  # an operator problem: not retried


async def test_a_400_passes_the_upstreams_reason_on_without_the_key() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.error_message = f"dimensions must be <= 8 (your key {SECRET})"
    upstream.script.append((400, {}))
    client, _ = _client(upstream, clock)
    with pytest.raises(InvalidInput) as caught:
        await client.embed(["text"], dimensions=64)
    await client.close()
    assert "dimensions must be <= 8" in caught.value.message
    assert SECRET not in caught.value.message and "***" in caught.value.message
    assert len(upstream.bodies) == 1


async def test_an_unknown_upstream_model_is_a_502() -> None:
    upstream, clock = FakeUpstream(), FakeTime()
    upstream.script.append((404, {}))
    client, _ = _client(upstream, clock)
    with pytest.raises(UpstreamFailed) as caught:
        await client.embed(["text"], dimensions=None)
    await client.close()
    assert caught.value.code == "upstream_model_not_found"


def test_retry_after_headers_are_read_as_ms_seconds_or_a_date() -> None:
    assert retry_after_seconds(httpx2.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_after_seconds(httpx2.Headers({"retry-after": "7"})) == 7.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    parsed = retry_after_seconds(httpx2.Headers({"retry-after": later}))
    assert parsed is not None and 25 <= parsed <= 31
    assert retry_after_seconds(httpx2.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx2.Headers({})) is None
