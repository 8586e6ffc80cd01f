"""Faults under load: Redis flushed, paused (SIGSTOP), killed and restarted while requests
flow: no request fails, the rate limiter fails open, caching resumes. And a model that raises
inside a batch: that batch's requests get a generic error, the service keeps serving.

(A Celery worker killed mid-chunk is tests/integration/test_batches_celery.py.)"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from embedpipe.settings import Settings
from tests.fakes import FakeEmbedder, fake_app
from tests.integration.conftest import MODEL
from tests.redis_server import RedisServer, command
from tests.server_process import ServerProcess

HOT = [f"a hot text every request repeats, number {i}" for i in range(8)]


class Load:
    """Requests on a thread until stopped: each repeats two hot texts and adds two new ones."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.slowest = 0.0
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=30) as client:
            number = 0
            while not self._stop.is_set():
                number += 1
                texts = [HOT[number % 8], HOT[(number + 3) % 8]]
                texts += [f"fresh text {uuid.uuid4().hex} #{number}" for _ in range(2)]
                started = time.monotonic()
                try:
                    reply = client.post("/v1/embeddings", json={"model": MODEL, "input": texts})
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                    continue
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.statuses[reply.status_code] += 1
                if reply.status_code != 200:
                    self.failures.append(reply.text)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.mark.model
@pytest.mark.server
@pytest.mark.redis
@pytest.mark.reliability
def test_redis_flushed_paused_killed_and_restarted_under_load(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    server = ServerProcess(
        {
            "EMBEDPIPE_REDIS_URL": private_redis.url,
            "EMBEDPIPE_DATA_DIR": str(tmp_path / "data"),
            "EMBEDPIPE_RATE_LIMIT_RPM": "100000",  # limits on; never the reason for a refusal
            "EMBEDPIPE_CACHE__BREAKER_RESET_SECONDS": "1",
            "EMBEDPIPE_SECURITY__RETRY_SECONDS": "1",
            "EMBEDPIPE_LOG_LEVEL": "warning",
        },
        tmp_path / "server.log",
    ).start()
    try:
        with Load(server.url) as load:
            time.sleep(2)
            command(private_redis.port, "FLUSHALL")
            time.sleep(2)
            private_redis.pause()
            time.sleep(3)
            private_redis.resume()
            time.sleep(2)
            private_redis.stop()
            time.sleep(3)
            private_redis.start()
            time.sleep(3)
        assert load.failures == [], load.failures[:3]
        assert load.statuses[200] > 20, load.statuses
        # Each request waited at most a few Redis timeouts, never a hung server's minute.
        assert load.slowest < 10, load.slowest
        assert server.metric("embedpipe_rate_limiter_errors_total") > 0  # it failed open

        # Caching resumes on the restarted (empty) Redis: a new text is written back, and the
        # next request for it is a hit.
        text = f"written to the restarted redis {uuid.uuid4().hex}"
        deadline = time.monotonic() + 30
        while True:
            httpx.post(f"{server.url}/embed", json={"text": text}, timeout=30)
            if int(command(private_redis.port, "DBSIZE")) > 0:
                break
            assert time.monotonic() < deadline, "nothing was written to the restarted Redis"
            time.sleep(1)
        again = httpx.post(f"{server.url}/embed", json={"text": text}, timeout=30).json()
        assert again["cached"] is True
        assert "Traceback" not in server.logs()
        print(f"faults: {load.statuses[200]} requests, all 200, slowest {load.slowest:.2f} s")
    finally:
        server.stop()


@pytest.mark.reliability
async def test_a_model_raising_fails_its_batch_with_a_generic_error_only(tmp_path: Path) -> None:
    embedder = FakeEmbedder(fail_on="poison pill")
    app, runtime = fake_app(Settings(data_dir=tmp_path / "data"), embedder)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            failed = await client.post(
                "/v1/embeddings", json={"model": "fake", "input": ["fine", "poison pill"]}
            )
            assert failed.status_code == 500
            error = failed.json()["error"]
            assert error["type"] == "server_error"
            assert "secret internal detail" not in failed.text  # the exception stays inside
            assert "Traceback" not in failed.text
            for _ in range(3):  # later batches, and the service, carry on
                fine = await client.post(
                    "/v1/embeddings", json={"model": "fake", "input": ["fine", "also fine"]}
                )
                assert fine.status_code == 200
            assert (await client.get("/health")).status_code == 200
    finally:
        await runtime.close()
