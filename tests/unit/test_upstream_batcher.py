"""The upstream batcher packing texts into calls, through the real client and ``openai`` SDK
against an in-memory OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from embedpipe.errors import InvalidInput, NotReady, UpstreamFailed, UpstreamRateLimited
from embedpipe.settings import UpstreamSettings
from embedpipe.upstream import UpstreamBatcher, UpstreamClient, UpstreamModel
from tests.fakes import FakeUpstream, vector_for

Factory = Callable[..., UpstreamBatcher]


@pytest.fixture
async def make_batcher() -> AsyncIterator[Factory]:
    started: list[UpstreamBatcher] = []

    def make(
        upstream: FakeUpstream, model: UpstreamModel | None = None, **overrides: float
    ) -> UpstreamBatcher:
        settings = UpstreamSettings(**{"max_wait_ms": 20.0, **overrides})
        model = model or UpstreamModel("up", "emb-model", "http://upstream.test/v1")
        client = UpstreamClient("up", "emb-model", upstream.sdk(), settings)
        batcher = UpstreamBatcher(model, client, settings)
        batcher.start()
        started.append(batcher)
        return batcher

    yield make
    for batcher in started:
        await batcher.stop()


async def test_a_request_over_the_input_cap_is_split_into_calls(make_batcher: Factory) -> None:
    upstream = FakeUpstream()
    batcher = make_batcher(upstream, max_inputs_per_call=512)
    texts = [f"text {i}" for i in range(3000)]
    items = batcher.submit(texts, [2] * len(texts))
    vectors = await asyncio.gather(*(item.future for item in items))
    assert sorted(len(body["input"]) for body in upstream.bodies) == [440] + [512] * 5
    # Calls run concurrently, so they may reach the upstream in any order; each holds a slice
    # of the request, in order.
    calls = sorted(upstream.bodies, key=lambda body: texts.index(body["input"][0]))
    assert [text for body in calls for text in body["input"]] == texts
    for i in (0, 511, 512, 2999):
        np.testing.assert_array_equal(vectors[i], vector_for(texts[i]))


async def test_a_call_holds_at_most_the_token_cap(make_batcher: Factory) -> None:
    upstream = FakeUpstream()
    batcher = make_batcher(upstream, max_tokens_per_call=100)
    texts = [f"t{i}" for i in range(7)]
    items = batcher.submit(texts, [40, 40, 40, 10, 10, 90, 200])
    await asyncio.gather(*(item.future for item in items))
    # Packed in request order: 40+40 | 40+10+10 | 90 | 200 (alone: one input is never refused
    # here). The calls run concurrently and may reach the upstream in any order.
    calls = sorted(upstream.bodies, key=lambda body: texts.index(body["input"][0]))
    assert [body["input"] for body in calls] == [texts[0:2], texts[2:5], texts[5:6], texts[6:7]]


async def test_concurrent_requests_share_one_call(make_batcher: Factory) -> None:
    upstream = FakeUpstream()
    batcher = make_batcher(upstream)
    items = [batcher.submit([f"text {i}"], [2])[0] for i in range(10)]
    await asyncio.gather(*(item.future for item in items))
    assert len(upstream.bodies) == 1 and len(upstream.bodies[0]["input"]) == 10


async def test_each_size_gets_its_own_calls(make_batcher: Factory) -> None:
    upstream = FakeUpstream(dimensions=8)
    batcher = make_batcher(upstream)
    full = batcher.submit(["a", "b"], [1, 1])
    small = batcher.submit(["a"], [1], dimensions=4)
    vectors = await asyncio.gather(*(item.future for item in (*full, *small)))
    sizes = sorted((body.get("dimensions", 0), len(body["input"])) for body in upstream.bodies)
    assert sizes == [(0, 2), (4, 1)]
    np.testing.assert_array_equal(vectors[2], vector_for("a", 4))
    assert vectors[0].shape == (8,)


async def test_no_more_calls_in_flight_than_the_concurrency(make_batcher: Factory) -> None:
    upstream = FakeUpstream()
    upstream.pause = asyncio.Event()
    batcher = make_batcher(upstream, max_inputs_per_call=1, concurrency=2, max_wait_ms=0.0)
    items = batcher.submit([f"t{i}" for i in range(6)], [1] * 6)
    await asyncio.wait_for(upstream.wait_in_flight(2), timeout=10)
    await asyncio.sleep(0.05)  # room for a third call, were it allowed
    assert upstream.max_in_flight == 2 and batcher.queue_depth == 4
    upstream.pause.set()
    await asyncio.gather(*(item.future for item in items))
    assert len(upstream.bodies) == 6 and upstream.max_in_flight == 2


async def test_a_model_of_unknown_size_learns_it_and_then_holds_to_it(
    make_batcher: Factory,
) -> None:
    upstream = FakeUpstream(dimensions=8)
    model = UpstreamModel("up", "emb-model", "http://upstream.test/v1")
    batcher = make_batcher(upstream, model)
    assert model.info.dimensions == 0
    await batcher.submit(["a"], [1])[0].future
    assert model.info.dimensions == 8
    upstream.dimensions = 16  # the upstream changed its model under us
    with pytest.raises(UpstreamFailed, match="16-dimensional"):
        await batcher.submit(["b"], [1])[0].future


async def test_every_waiter_gets_the_calls_error(make_batcher: Factory) -> None:
    upstream = FakeUpstream()
    upstream.script.append((400, {}))
    batcher = make_batcher(upstream)
    first, second = batcher.submit(["a"], [1])[0], batcher.submit(["b"], [1])[0]
    results = await asyncio.gather(first.future, second.future, return_exceptions=True)
    assert all(isinstance(result, InvalidInput) for result in results)
    assert len(upstream.bodies) == 1


async def test_an_upstream_429_reaches_the_waiters_with_its_retry_after(
    make_batcher: Factory,
) -> None:
    upstream = FakeUpstream()
    upstream.script.append((429, {"retry-after": "45"}))
    batcher = make_batcher(upstream, deadline_seconds=5.0)
    item = batcher.submit(["a"], [1])[0]
    with pytest.raises(UpstreamRateLimited) as caught:
        await asyncio.wait_for(item.future, timeout=10)
    assert caught.value.retry_after == 45


async def test_texts_nobody_waits_for_are_not_sent(make_batcher: Factory) -> None:
    upstream = FakeUpstream()
    batcher = make_batcher(upstream, max_wait_ms=50.0)
    gone, kept = batcher.submit(["gone", "kept"], [1, 1])
    gone.leave()
    await kept.future
    assert upstream.bodies[0]["input"] == ["kept"]


async def test_stop_fails_what_still_waits(make_batcher: Factory) -> None:
    upstream = FakeUpstream()
    upstream.pause = asyncio.Event()
    batcher = make_batcher(upstream, max_inputs_per_call=1, concurrency=1, max_wait_ms=0.0)
    sent, queued = batcher.submit(["sent", "queued"], [1, 1])
    await asyncio.wait_for(upstream.wait_in_flight(1), timeout=10)
    await batcher.stop()
    for item in (sent, queued):  # in flight or queued: an answer, never a hang
        with pytest.raises(NotReady):
            await item.future
    with pytest.raises(NotReady):
        batcher.submit(["late"], [1])
