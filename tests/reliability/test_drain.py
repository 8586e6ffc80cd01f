"""SIGTERM with requests in flight: /ready turns 503 at once, new work is refused with 503 +
Retry-After, every accepted request completes with its vectors, then the process exits within
the drain delay plus the time the accepted work needs."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.reliability]

DRAIN_DELAY = 3.0


def test_sigterm_drains_accepted_work_and_admits_none(tmp_path: Path) -> None:
    with ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(tmp_path / "data"),
            "EMBEDPIPE_DRAIN_DELAY_SECONDS": str(DRAIN_DELAY),
            "EMBEDPIPE_DRAIN_TIMEOUT_SECONDS": "120",
        },
        tmp_path / "server.log",
    ).start() as server:
        assert server.process is not None
        replies: dict[int, httpx.Response] = {}

        def send(client_number: int) -> None:
            texts = [
                f"client {client_number} text {i} in flight at SIGTERM " * 10 for i in range(48)
            ]
            replies[client_number] = httpx.post(
                f"{server.url}/v1/embeddings", json={"model": MODEL, "input": texts}, timeout=180
            )

        senders = [threading.Thread(target=send, args=(number,)) for number in range(6)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        # All six admitted before the signal: a loaded machine can start a sender late.
        while server.metric("embedpipe_http_requests_in_flight") < len(senders):
            assert time.monotonic() < deadline, "the requests never reached the queue"
            time.sleep(0.02)

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{server.url}/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["status"] == "draining"
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        refused = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "new work"}, timeout=5
        )
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "draining"

        for sender in senders:
            sender.join(timeout=180)
        assert sorted(replies) == list(range(6))
        for reply in replies.values():
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["data"]) == 48
        # uvicorn re-raises the signal after a graceful shutdown, so the status says SIGTERM.
        assert server.process.wait(timeout=120) in (0, -signal.SIGTERM)
        drain_seconds = time.monotonic() - signalled
        assert drain_seconds >= DRAIN_DELAY  # the listener stayed open for the load balancers
        print(f"drain: SIGTERM to exit {drain_seconds:.1f} s, 6 of 6 requests in flight completed")
