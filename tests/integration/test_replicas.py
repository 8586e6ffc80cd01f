"""Two server processes sharing one Redis: the cache is shared, survives restarts, and a hung
Redis degrades the service (slower misses) instead of failing it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_redis_server
from tests.integration.conftest import MODEL
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.redis]


class Replicas:
    def __init__(self, redis: RedisServer, a: ServerProcess, b: ServerProcess) -> None:
        self.redis = redis
        self.a = a
        self.b = b


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    require_redis_server()
    root = tmp_path_factory.mktemp("replicas")
    # Its own Redis: this module pauses and kills it.
    with RedisServer.start_new(root / "redis") as redis:
        env = {
            "EMBEDPIPE_REDIS_URL": redis.url,
            "EMBEDPIPE_DATA_DIR": str(root / "data"),
            "EMBEDPIPE_CACHE__NAMESPACE": f"replicas{redis.port}",
            "EMBEDPIPE_CACHE__BREAKER_RESET_SECONDS": "1",
        }
        a = ServerProcess(env, root / "a.log").start()
        b = ServerProcess(env, root / "b.log").start()
        try:
            yield Replicas(redis, a, b)
        finally:
            a.stop()
            b.stop()


def _embed(server: ServerProcess, text: str, timeout: float = 30.0) -> dict[str, object]:
    reply = httpx.post(f"{server.url}/embed", json={"text": text}, timeout=timeout)
    assert reply.status_code == 200, reply.text
    body: dict[str, object] = reply.json()
    return body


def test_a_vector_computed_by_one_replica_is_a_hit_on_the_other(replicas: Replicas) -> None:
    text = "computed once, served by every replica"
    l2_before = replicas.b.metric("embedpipe_embeddings_total", model=MODEL, source="l2")
    first = _embed(replicas.a, text)
    replicas.a.wait_for_cache_writes()
    second = _embed(replicas.b, text)
    assert first["cached"] is False
    assert second["cached"] is True
    assert second["embedding"] == first["embedding"]
    assert (
        replicas.b.metric("embedpipe_embeddings_total", model=MODEL, source="l2") == l2_before + 1
    )


def test_the_cache_survives_a_replica_restart(replicas: Replicas) -> None:
    text = "still cached after the process restarts"
    first = _embed(replicas.a, text)
    replicas.a.stop()
    replicas.a.start()
    again = _embed(replicas.a, text)
    assert again["cached"] is True
    assert again["embedding"] == first["embedding"]


def test_a_hung_redis_degrades_the_service_and_caching_comes_back(replicas: Replicas) -> None:
    replicas.redis.pause()  # SIGSTOP: connections hang, nothing answers
    try:
        for index in range(5):
            started = time.monotonic()
            reply = _embed(replicas.a, f"served while redis hangs {index}")
            assert reply["cached"] is False
            assert time.monotonic() - started < 5.0  # generous: bounded by short timeouts
        ready = httpx.get(f"{replicas.a.url}/ready", timeout=5)
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["degraded"] == ["l2"]
    finally:
        replicas.redis.resume()
    # After the breaker's reset period one probe goes through and caching resumes by itself.
    text = "cached again once redis is back"
    deadline = time.monotonic() + 20
    while True:
        _embed(replicas.a, text)
        if _embed(replicas.b, text)["cached"] is True:
            break
        assert time.monotonic() < deadline, "caching did not resume after Redis came back"
        text += "!"
        time.sleep(0.5)
    assert httpx.get(f"{replicas.a.url}/ready", timeout=5).json()["status"] == "ready"


def test_a_killed_and_restarted_redis_is_survived(replicas: Replicas, tmp_path: Path) -> None:
    replicas.redis.stop()
    try:
        reply = _embed(replicas.b, "served while redis is gone")
        assert reply["cached"] is False
    finally:
        replicas.redis.start()
    text = "cached in the fresh redis"
    deadline = time.monotonic() + 20
    while True:
        _embed(replicas.b, text)
        if _embed(replicas.a, text)["cached"] is True:
            break
        assert time.monotonic() < deadline, "caching did not resume after Redis restarted"
        text += "!"
        time.sleep(0.5)
