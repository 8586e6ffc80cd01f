"""A real ``embedpipe worker`` (Celery) process for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.server_process import free_port, scrape_metric


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.log_path = log_path
        self.name = name
        # Its own /metrics port (`--metrics-port`), so tests can see what this worker did.
        self.metrics_port = free_port()
        self._env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "EMBEDPIPE_MODEL_THREADS": "1",
            "EMBEDPIPE_JOBS__WORKER_METRICS_PORT": str(self.metrics_port),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        # The log is appended to across restarts: wait for a "ready." of this start.
        readies = (
            self.log_path.read_text(errors="replace").count("ready.")
            if (self.log_path.exists())
            else 0
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "embedpipe", "worker", "--hostname", self.name],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while self.log_path.read_text(errors="replace").count("ready.") <= readies:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"worker not ready after {timeout}s:\n{self.logs()}")
            time.sleep(0.2)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no acknowledgement; its chunk must be delivered again."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def metric(self, name: str, **labels: str) -> float:
        """A sample from this worker's /metrics (0 when absent)."""
        host = self._env.get("EMBEDPIPE_HOST", "127.0.0.1")
        return scrape_metric(f"http://{host}:{self.metrics_port}", name, **labels)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path.exists() else ""
