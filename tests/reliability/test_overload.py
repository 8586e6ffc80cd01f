"""A storm of 400 concurrent clients, 64 texts each: what cannot be queued is shed with 429/503
and Retry-After (admission counts texts, not requests), the rest is served, memory stays
bounded, no request gets a 500, and a normal request is answered quickly after the storm."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.reliability]

CLIENTS = 400
TEXTS_PER_CLIENT = 64
# Small enough that the served part of the storm takes seconds on 2 cores, not minutes.
QUEUE_TEXTS = 1024


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples a process's resident memory every 50 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, _rss_bytes(self.pid))
            except OSError:
                return

    def __enter__(self) -> PeakRss:
        self.peak = _rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def _storm(url: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:

        async def one(number: int) -> httpx.Response:
            texts = [f"storm client {number} text {i}" for i in range(TEXTS_PER_CLIENT)]
            return await client.post("/v1/embeddings", json={"model": MODEL, "input": texts})

        return await asyncio.gather(*(one(number) for number in range(CLIENTS)))


def test_a_storm_is_shed_cleanly_and_the_service_recovers(tmp_path: Path) -> None:
    server = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(tmp_path / "data"),
            "EMBEDPIPE_BATCHING__MAX_QUEUE_TEXTS": str(QUEUE_TEXTS),
            # The storm's clients share one address here; in life they are many machines.
            "EMBEDPIPE_HTTP__MAX_CONNECTIONS_PER_CLIENT": "100000",
            "EMBEDPIPE_LOG_LEVEL": "warning",
        },
        tmp_path / "server.log",
    ).start()
    assert server.process is not None
    try:
        started = time.monotonic()
        with PeakRss(server.process.pid) as rss:
            replies = asyncio.run(_storm(server.url))
        storm_seconds = time.monotonic() - started

        statuses = Counter(reply.status_code for reply in replies)
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses[200] >= QUEUE_TEXTS // TEXTS_PER_CLIENT  # a full queue's worth served
        shed = [reply for reply in replies if reply.status_code != 200]
        assert shed, "nothing was shed: the storm did not overload the queue"
        for reply in shed:
            assert int(reply.headers["retry-after"]) >= 1
            error = reply.json()["error"]
            assert error["message"] and error["type"]  # OpenAI's envelope, no stack trace
        for reply in replies:
            if reply.status_code == 200:
                assert len(reply.json()["data"]) == TEXTS_PER_CLIENT
        assert rss.peak < 3 * 1024**3

        # After the storm: a normal request, answered promptly (a generous bound).
        before = time.monotonic()
        after = httpx.post(
            f"{server.url}/v1/embeddings",
            json={"model": MODEL, "input": "a normal request after the storm"},
            timeout=30,
        )
        latency = time.monotonic() - before
        assert after.status_code == 200
        assert latency < 1.0
        assert "Traceback" not in server.logs()
        print(
            f"overload: {CLIENTS} clients x {TEXTS_PER_CLIENT} texts in {storm_seconds:.1f} s: "
            f"served {statuses[200]}, shed {len(shed)} ({len(shed) / CLIENTS:.0%}), "
            f"peak RSS {rss.peak / 2**20:.0f} MiB, next request {latency * 1000:.0f} ms"
        )
    finally:
        server.stop()


SOAK_SECONDS = float(os.environ.get("EMBEDPIPE_SOAK_SECONDS", "0"))


@pytest.mark.skipif(SOAK_SECONDS <= 0, reason="a soak run: `make soak` (EMBEDPIPE_SOAK_SECONDS)")
def test_soak_storm_after_storm_memory_stays_level(tmp_path: Path) -> None:
    """``make soak``: storms back to back for EMBEDPIPE_SOAK_SECONDS with the default queue
    (8,192 texts): never a 500, and resident memory levels off instead of growing."""
    server = ServerProcess(
        {"EMBEDPIPE_DATA_DIR": str(tmp_path / "data"), "EMBEDPIPE_LOG_LEVEL": "warning"},
        tmp_path / "server.log",
    ).start()
    assert server.process is not None
    peaks: list[int] = []
    totals: Counter[int] = Counter()
    try:
        deadline = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < deadline:
            with PeakRss(server.process.pid) as rss:
                replies = asyncio.run(_storm(server.url))
            totals.update(reply.status_code for reply in replies)
            peaks.append(rss.peak)
            print(
                f"storm {len(peaks)}: {Counter(r.status_code for r in replies)}, "
                f"peak RSS {rss.peak / 2**20:.0f} MiB"
            )
        assert set(totals) <= {200, 429, 503}, totals
        assert max(peaks) < 3 * 1024**3
        if len(peaks) >= 3:  # the first storms fill caches and arenas; then it must level off
            assert peaks[-1] <= peaks[1] * 1.25, peaks
    finally:
        server.stop()
