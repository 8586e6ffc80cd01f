"""A private ``redis-server`` process for tests: started on a free port, in its own directory,
without persistence, and controllable (pause with SIGSTOP, resume, kill, restart on the same
port) so tests can inject real faults instead of mocking Redis.

    server = RedisServer.start_new(tmp_path)
    ...
    server.close()
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

REDIS_SERVER_ENV = "EMBEDPIPE_REDIS_SERVER"
NO_REDIS_SERVER = (
    "redis-server not found: `make test` installs it; or set EMBEDPIPE_TEST_REDIS_URL "
    "(a running Redis) or EMBEDPIPE_REDIS_SERVER (the binary)"
)


def _die_with_parent() -> None:
    """In the child before exec: on Linux, be killed when the test process dies, even by
    SIGKILL (a CI timeout), so no redis-server outlives its tests."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def find_redis_server() -> str | None:
    """The ``redis-server`` binary: ``$EMBEDPIPE_REDIS_SERVER`` or the one on PATH."""
    return os.environ.get(REDIS_SERVER_ENV) or shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(100):
        port = random.randint(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def command(port: int, *args: str | int, timeout: float = 5.0) -> str:
    """Send one command over raw RESP; return a status or bulk reply (raise on an error)."""
    parts = [str(a).encode() for a in args]
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            reply += chunk
            header, sep, body = reply.partition(b"\r\n")
            if not sep:
                continue
            if header[:1] == b"-":
                raise RuntimeError(header[1:].decode())
            if header[:1] != b"$":
                return header[1:].decode()
            if len(body) >= int(header[1:]) + 2:
                return body[: int(header[1:])].decode()


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
            preexec_fn=_die_with_parent,
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


class RedisClusterServers:
    """A Redis Cluster of private redis-server processes, primaries only."""

    def __init__(self, workdir: Path, binary: str | None = None, size: int = 3) -> None:
        self.workdir = workdir
        self.binary = binary or find_redis_server() or "redis-server"
        self.size = size
        self.ports: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """A URL for ``RedisTier.from_url``: one startup node, the rest is discovered."""
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=true"

    def start(self, timeout: float = 20.0) -> None:
        """Start the nodes, give each a third of the slots and introduce them; return once
        every node sees the whole cluster healthy. (Faster and steadier than
        ``redis-cli --cluster create``, which polls once a second.)"""
        for _ in range(self.size):
            port = free_cluster_port()
            node_dir = self.workdir / str(port)
            node_dir.mkdir(parents=True)
            args = [self.binary, "--port", str(port), "--bind", "127.0.0.1"]
            args += ["--save", "", "--appendonly", "no", "--cluster-enabled", "yes"]
            args += ["--dir", str(node_dir), "--logfile", str(node_dir / "redis.log")]
            self._procs.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            )
            self.ports.append(port)
        deadline = time.monotonic() + timeout
        while not all(answers_ping(port) for port in self.ports):
            if any(proc.poll() is not None for proc in self._procs):
                raise RuntimeError(f"a cluster node exited at start, see {self.workdir}")
            if time.monotonic() > deadline:
                raise TimeoutError("cluster nodes did not start")
            time.sleep(0.02)
        step = 16384 // self.size
        for i, port in enumerate(self.ports):
            last = 16383 if i == self.size - 1 else (i + 1) * step - 1
            command(port, "CLUSTER", "ADDSLOTSRANGE", i * step, last)
            if i:
                command(port, "CLUSTER", "MEET", "127.0.0.1", self.ports[0])
        while not all(self._healthy(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not become healthy")
            time.sleep(0.05)

    def _healthy(self, port: int) -> bool:
        info = command(port, "CLUSTER", "INFO")
        fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_ok") == "16384"
            and fields.get("cluster_known_nodes") == str(self.size)
        )

    def close(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> RedisClusterServers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
