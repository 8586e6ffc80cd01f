"""An API replica started while its broker Redis is down comes up unready (/ready 503, one
log line saying why) instead of dying in its lifespan, and turns ready by itself once the
broker answers. The compose stack checks the same with containers (tests/stack)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisServer
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.redis]

UNREACHABLE = "the broker Redis is unreachable"


def _wait_until(condition: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {condition} after {timeout} s"
        time.sleep(0.2)


def test_an_api_started_without_its_broker_is_unready_until_the_broker_answers(
    redis_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    private_redis.stop()
    server = ServerProcess(
        {"EMBEDPIPE_REDIS_URL": redis_url, "EMBEDPIPE_BROKER_URL": private_redis.url},
        tmp_path / "server.log",
    )
    with server:
        server.start(probe="/health")
        _wait_until("logged", lambda: UNREACHABLE in server.logs())
        ready = httpx.get(f"{server.url}/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["status"] == "starting"
        assert ready.json()["waiting_for"] == ["broker"]
        # Embeddings do not need the broker: the replica serves them meanwhile.
        embedded = httpx.post(f"{server.url}/embed", json={"text": "no broker yet"}, timeout=60)
        assert embedded.status_code == 200

        private_redis.start()
        _wait_until(
            "ready",
            lambda: httpx.get(f"{server.url}/ready", timeout=5).status_code == 200,
        )
        assert httpx.get(f"{server.url}/ready", timeout=5).json()["waiting_for"] == []
        logs = server.logs()
        assert logs.count(UNREACHABLE) == 1, logs
        assert "the broker Redis answers: ready" in logs


def _upload(url: str) -> httpx.Response:
    line = '{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}'
    files = {"file": ("batch.jsonl", line.encode() + b"\n", "application/jsonl")}
    return httpx.post(f"{url}/v1/files", data={"purpose": "batch"}, files=files, timeout=30)


def test_a_broker_that_goes_away_is_a_503_to_retry_never_a_500(
    redis_url: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    env = {"EMBEDPIPE_REDIS_URL": redis_url, "EMBEDPIPE_BROKER_URL": private_redis.url}
    with ServerProcess(env, tmp_path / "server.log") as server:
        server.start()
        assert _upload(server.url).status_code == 200
        private_redis.stop()
        refused = _upload(server.url)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "service_unavailable"
        # Back: the same replica uses it again, with no restart.
        private_redis.start()
        _wait_until("uploads work again", lambda: _upload(server.url).status_code == 200)
