"""A private ``redis-server`` process for tests: started on a free port, in its own directory,
without persistence, and controllable (pause with SIGSTOP, resume, kill, restart on the same
port) so tests can inject real faults instead of mocking Redis.

    server = RedisServer.start_new(tmp_path)
    ...
    server.close()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

REDIS_SERVER_ENV = "EMBEDPIPE_REDIS_SERVER"


def find_redis_server() -> str | None:
    """The ``redis-server`` binary: ``$EMBEDPIPE_REDIS_SERVER`` or the one on PATH."""
    return os.environ.get(REDIS_SERVER_ENV) or shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers_ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``, data and log under ``workdir``."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls, workdir: Path, binary: str | None = None) -> RedisServer:
        binary = binary or find_redis_server()
        if binary is None:
            raise FileNotFoundError("redis-server not found (set EMBEDPIPE_REDIS_SERVER)")
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(binary, free_port(), workdir)
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        return self._proc.pid

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart after :meth:`stop`) on the same port; wait until it answers."""
        if self._proc is not None:
            raise RuntimeError("redis-server is already running")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]  # a cache for tests: no persistence
        args += ["--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not answers_ping(self.port):
            if self._proc.poll() is not None:
                self._proc = None
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited at start:\n{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.02)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing is ever answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill it like a crash (SIGKILL works on a paused process too) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)

    def close(self) -> None:
        """Shut down cleanly if possible; always leaves no process behind."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.terminate()
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        except ProcessLookupError:
            proc.wait(timeout=5)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
