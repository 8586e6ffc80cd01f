from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest

from embedpipe.batcher import MicroBatcher
from embedpipe.errors import ModelFailed, Overloaded
from embedpipe.settings import BatchingSettings
from tests.fakes import FakeEmbedder, vector_for


def _settings(**overrides: float) -> BatchingSettings:
    return BatchingSettings(**{"max_wait_ms": 20.0, **overrides})


async def _started(embedder: FakeEmbedder, settings: BatchingSettings) -> MicroBatcher:
    batcher = MicroBatcher(embedder, settings)
    batcher.start()
    return batcher


async def test_concurrent_submissions_share_one_model_call() -> None:
    embedder = FakeEmbedder()
    batcher = await _started(embedder, _settings())
    try:
        items = [batcher.submit([f"text {i}"], [4])[0] for i in range(10)]
        vectors = await asyncio.gather(*(item.future for item in items))
    finally:
        await batcher.stop()
    assert len(embedder.calls) == 1
    assert sorted(embedder.calls[0]) == sorted(f"text {i}" for i in range(10))
    for i, vector in enumerate(vectors):
        np.testing.assert_allclose(vector, vector_for(f"text {i}"))


async def test_batches_respect_size_and_token_budget() -> None:
    embedder = FakeEmbedder()
    embedder.gate = threading.Event()
    batcher = await _started(embedder, _settings(max_batch_size=4, max_batch_tokens=256))
    try:
        first = batcher.submit(["blocker"], [3])  # occupies the model while the queue fills
        await asyncio.sleep(0.05)
        texts = [f"t{i}" for i in range(10)]
        tokens = [10] * 8 + [200, 200]
        items = batcher.submit(texts, tokens)
        embedder.gate.set()
        await asyncio.gather(*(item.future for item in first + items))
    finally:
        await batcher.stop()
    batches = embedder.calls[1:]
    assert all(len(batch) <= 4 for batch in batches)
    for batch in batches:
        lengths = [dict(zip(texts, tokens, strict=True))[text] for text in batch]
        assert len(batch) * max(lengths) <= 256 or len(batch) == 1
    assert sorted(text for batch in batches for text in batch) == sorted(texts)


async def test_texts_of_similar_length_are_grouped() -> None:
    embedder = FakeEmbedder()
    embedder.gate = threading.Event()
    batcher = await _started(embedder, _settings(max_batch_size=4))
    try:
        blocker = batcher.submit(["blocker"], [3])
        await asyncio.sleep(0.05)
        # Interleaved short and long texts: each batch should hold one kind only.
        texts = [f"s{i}" if i % 2 == 0 else f"l{i}" for i in range(8)]
        tokens = [5 if text.startswith("s") else 250 for text in texts]
        items = batcher.submit(texts, tokens)
        embedder.gate.set()
        await asyncio.gather(*(item.future for item in blocker + items))
    finally:
        await batcher.stop()
    for batch in embedder.calls[1:]:
        assert len({text[0] for text in batch}) == 1, batch


async def test_a_batch_stops_growing_before_padding_exceeds_the_bound() -> None:
    embedder = FakeEmbedder()
    embedder.gate = threading.Event()
    batcher = await _started(embedder, _settings(max_batch_size=8, max_padding=0.1))
    try:
        blocker = batcher.submit(["blocker"], [3])
        await asyncio.sleep(0.05)
        # Size and token budget would take all six in one call: padding does not.
        texts = ["long", "near1", "near2", "short1", "short2", "short3"]
        items = batcher.submit(texts, [120, 100, 90, 20, 20, 20])
        embedder.gate.set()
        await asyncio.gather(*(item.future for item in blocker + items))
    finally:
        await batcher.stop()
    assert [sorted(batch) for batch in embedder.calls[1:]] == [
        ["long", "near1", "near2"],
        ["short1", "short2", "short3"],
    ]


async def test_full_queue_is_refused_whole() -> None:
    embedder = FakeEmbedder()
    embedder.gate = threading.Event()
    batcher = await _started(embedder, _settings(max_queue_texts=5))
    try:
        running = batcher.submit(["running"], [3])
        await asyncio.sleep(0.05)
        queued = batcher.submit(["a", "b", "c", "d"], [3] * 4)
        with pytest.raises(Overloaded) as refused:
            batcher.submit(["e", "f"], [3, 3])
        assert refused.value.retry_after > 0
        assert batcher.queue_depth == 4
        embedder.gate.set()
        await asyncio.gather(*(item.future for item in running + queued))
    finally:
        await batcher.stop()


async def test_abandoned_texts_are_not_computed() -> None:
    embedder = FakeEmbedder()
    embedder.gate = threading.Event()
    batcher = await _started(embedder, _settings())
    try:
        running = batcher.submit(["running"], [3])
        await asyncio.sleep(0.05)
        gone, kept = batcher.submit(["gone", "kept"], [3, 3])
        gone.leave()
        embedder.gate.set()
        await asyncio.gather(running[0].future, kept.future)
    finally:
        await batcher.stop()
    computed = [text for batch in embedder.calls for text in batch]
    assert "gone" not in computed
    assert "kept" in computed


async def test_shared_text_is_computed_while_any_waiter_remains() -> None:
    embedder = FakeEmbedder()
    embedder.gate = threading.Event()
    batcher = await _started(embedder, _settings())
    try:
        running = batcher.submit(["running"], [3])
        await asyncio.sleep(0.05)
        (shared,) = batcher.submit(["shared"], [3])
        shared.join()
        shared.leave()
        embedder.gate.set()
        await asyncio.gather(running[0].future, shared.future)
    finally:
        await batcher.stop()
    assert ["shared"] in embedder.calls


async def test_model_failure_fails_only_its_batch_with_a_generic_error() -> None:
    embedder = FakeEmbedder(fail_on="poison")
    batcher = await _started(embedder, _settings(max_wait_ms=0.0))
    try:
        (bad,) = batcher.submit(["poison"], [3])
        with pytest.raises(ModelFailed) as failed:
            await bad.future
        assert "secret" not in str(failed.value)
        (good,) = batcher.submit(["fine"], [3])
        np.testing.assert_allclose(await good.future, vector_for("fine"))
    finally:
        await batcher.stop()


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (checked every 5 ms, for at most 10 s)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def test_batch_job_texts_yield_to_online_ones() -> None:
    # Issue 19: one batch of 100 x 2,048 inputs raised another key's online latency to 21 s.
    embedder = FakeEmbedder()
    embedder.gate = threading.Event()
    batcher = await _started(embedder, _settings(max_batch_size=4))
    try:
        blocker = batcher.submit(["blocker"], [3])
        await _until(lambda: batcher.queue_depth == 0)  # the blocker is in the model
        background = batcher.submit([f"b{i}" for i in range(12)], [3] * 12, background=True)
        online = batcher.submit(["online"], [3])
        embedder.gate.set()
        await asyncio.gather(*(item.future for item in blocker + background + online))
    finally:
        await batcher.stop()
    # The call after the blocker is the online text's, although 12 batch texts came first.
    assert "online" in embedder.calls[1]
    assert all(text.startswith("b") for text in embedder.calls[1] if text != "online")


async def test_batch_job_texts_may_fill_half_the_queue_only() -> None:
    embedder = FakeEmbedder()
    embedder.gate = threading.Event()
    batcher = await _started(embedder, _settings(max_queue_texts=8))
    try:
        running = batcher.submit(["running"], [3])
        await _until(lambda: batcher.queue_depth == 0)
        queued = batcher.submit(["a", "b", "c", "d"], [3] * 4, background=True)
        with pytest.raises(Overloaded):
            batcher.submit(["e"], [3], background=True)
        # The other half stays free for online requests.
        online = batcher.submit(["f", "g", "h", "i"], [3] * 4)
        embedder.gate.set()
        await asyncio.gather(*(item.future for item in running + queued + online))
    finally:
        await batcher.stop()


async def _within_loop_turns(condition: Callable[[], bool], turns: int = 100) -> bool:
    """Whether ``condition`` holds within ``turns`` turns of the event loop (no clock involved:
    a batch that waited even 1 ms for company would take far more turns than this)."""
    for _ in range(turns):
        if condition():
            return True
        await asyncio.sleep(0)
    return condition()


async def test_a_lone_text_leaves_without_waiting_for_company() -> None:
    # Issue 20: the batcher waited max_wait_ms for company even when none could come.
    embedder = FakeEmbedder()
    batcher = await _started(embedder, _settings(max_wait_ms=1000.0))
    try:
        (alone,) = batcher.submit(["alone"], [3])
        assert await _within_loop_turns(lambda: batcher.queue_depth == 0)
        np.testing.assert_allclose(await alone.future, vector_for("alone"))
    finally:
        await batcher.stop()
    assert embedder.calls == [["alone"]]


async def test_a_batch_waits_for_a_request_on_its_way() -> None:
    embedder = FakeEmbedder()
    batcher = await _started(embedder, _settings(max_wait_ms=1000.0))
    try:
        with batcher.on_the_way():  # another request is still looking up the cache
            first = batcher.submit(["first"], [3])
            assert not await _within_loop_turns(lambda: batcher.queue_depth == 0)
            second = batcher.submit(["second"], [3])
        await asyncio.gather(*(item.future for item in first + second))
    finally:
        await batcher.stop()
    assert [sorted(call) for call in embedder.calls] == [["first", "second"]]


async def test_a_batch_stops_waiting_when_the_request_on_its_way_needs_no_model() -> None:
    embedder = FakeEmbedder()
    batcher = await _started(embedder, _settings(max_wait_ms=1000.0))
    try:
        with batcher.on_the_way():
            (first,) = batcher.submit(["first"], [3])
            assert not await _within_loop_turns(lambda: batcher.queue_depth == 0)
        # Its texts were all cached: the waiting batch leaves at once, not after max_wait.
        assert await _within_loop_turns(lambda: batcher.queue_depth == 0)
        await first.future
    finally:
        await batcher.stop()
    assert embedder.calls == [["first"]]
