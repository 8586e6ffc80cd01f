"""A server under test as a child process: started on a free port, waited for until its probe
answers, stopped with SIGTERM (then SIGKILL). The naive baseline and Infinity run this way;
embedpipe itself runs as tests/server_process.py starts it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import httpx

from tests.server_process import free_port


class ChildServer:
    """``command`` (with ``{port}`` filled in) until ``probe`` answers 200.

    >>> with ChildServer("naive", ["python", "-m", "x", "--port", "{port}"], "/stats", log) as s:
    ...     httpx.get(s.url + "/stats")
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        probe: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 180.0,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [part.replace("{port}", str(self.port)) for part in command]
        self._probe = probe
        self._env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._env.update(env or {})
        self._start_timeout = start_timeout
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command, env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.logs()}")
            try:
                httpx.get(f"{self.url}{self._probe}", timeout=1.0).raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"{self.name} did not start in {self._start_timeout:.0f} s")

    def __exit__(self, *_: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("not started")
        return self._process.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]
