"""SIGTERM while a request is in flight: the request completes, then the process exits."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]


def test_sigterm_lets_the_request_in_flight_finish(tmp_path: Path) -> None:
    with ServerProcess(
        {"EMBEDPIPE_DATA_DIR": str(tmp_path / "data")}, tmp_path / "log"
    ).start() as server:
        assert server.process is not None
        texts = [f"request in flight during shutdown, text number {i} " * 12 for i in range(128)]
        outcome: dict[str, httpx.Response] = {}

        def send() -> None:
            outcome["reply"] = httpx.post(
                f"{server.url}/v1/embeddings", json={"model": MODEL, "input": texts}, timeout=120
            )

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 30
        while server.metric("embedpipe_queue_depth", model=MODEL) == 0:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        sender.join(timeout=120)
        assert outcome["reply"].status_code == 200
        assert len(outcome["reply"].json()["data"]) == len(texts)
        # uvicorn re-raises the signal after a graceful shutdown, so the status says SIGTERM.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "shutting down" in server.logs()
