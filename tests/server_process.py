"""A real ``embedpipe serve`` process for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """Starts ``python -m embedpipe serve`` with the given settings, waits until /ready."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "EMBEDPIPE_HOST": "127.0.0.1",
            "EMBEDPIPE_PORT": str(self.port),
            # Two servers share this machine's cores in some tests.
            "EMBEDPIPE_MODEL_THREADS": "1",
            # Tests stop servers often; the drain tests set their own delay.
            "EMBEDPIPE_DRAIN_DELAY_SECONDS": "0",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0, probe: str = "/ready") -> ServerProcess:
        """Start and wait until ``probe`` answers 200 (``/health``: serving, maybe unready)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "embedpipe", "serve"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}{probe}", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.logs()}")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()  # also when the test failed half-way: no server left running

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        return scrape_metric(self.url, name, **labels)

    def wait_for_cache_writes(self, timeout: float = 30.0) -> None:
        """Until the L2 writes behind this server's answers have landed (an online answer
        does not wait for its write, so another replica may not see it the same instant)."""
        deadline = time.monotonic() + timeout
        while self.metric("embedpipe_cache_writes_pending", tier="l2") > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"L2 writes still pending on {self.url} after {timeout} s")
            time.sleep(0.01)


def scrape_metric(base_url: str, name: str, **labels: str) -> float:
    """The value of one sample on ``base_url``/metrics (0 when absent)."""
    return metric_value(scrape_metrics(base_url), name, **labels)


def scrape_metrics(base_url: str) -> str:
    """``base_url``/metrics, the exposition text (read once for several samples)."""
    return httpx.get(f"{base_url}/metrics", timeout=5.0).text


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in an exposition ``text`` (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        present = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if metric == name and present == wanted:
            return float(value)
    return 0.0
