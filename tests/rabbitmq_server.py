"""A private ``rabbitmq-server`` node for tests: its own node name, ports, data and log
directories and Erlang cookie, so it never touches a RabbitMQ the machine already runs.

    with RabbitMqServer.start_new(tmp_path) as server:
        server.url  # amqp://guest:guest@127.0.0.1:<port>//
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType

from tests.redis_server import free_port

RABBITMQ_SERVER_ENV = "EMBEDPIPE_RABBITMQ_SERVER"
NO_RABBITMQ_SERVER = (
    "rabbitmq-server not found: `make test` installs it (Debian package rabbitmq-server); "
    "or set EMBEDPIPE_TEST_AMQP_URL (a running RabbitMQ) or EMBEDPIPE_RABBITMQ_SERVER (the script)"
)
# Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user when run as root, which
# cannot write our directories: the script it wraps runs as whoever calls it.
_DEBIAN_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def find_rabbitmq_server() -> str | None:
    explicit = os.environ.get(RABBITMQ_SERVER_ENV)
    if explicit:
        return explicit
    if os.access(_DEBIAN_SCRIPT, os.X_OK):
        return _DEBIAN_SCRIPT
    return shutil.which("rabbitmq-server")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RabbitMqServer:
    def __init__(self, script: str, workdir: Path) -> None:
        self.script = script
        self.workdir = workdir
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls, workdir: Path, timeout: float = 90.0) -> RabbitMqServer:
        script = find_rabbitmq_server()
        if script is None:
            raise FileNotFoundError(NO_RABBITMQ_SERVER)
        server = cls(script, workdir)
        server.start(timeout)
        return server

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float) -> None:
        base = self.workdir
        (base / "home").mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": str(base / "home"),  # its own Erlang cookie
            "RABBITMQ_NODENAME": f"embedpipe-test-{uuid.uuid4().hex[:8]}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_MNESIA_DIR": str(base / "mnesia" / "node"),
            "RABBITMQ_QUORUM_DIR": str(base / "mnesia" / "quorum"),
            "RABBITMQ_STREAM_DIR": str(base / "mnesia" / "stream"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),  # none: the defaults
        }
        with (base / "server.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [self.script],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the script and its Erlang VM: one group to stop
            )
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self._proc.poll() is not None:
                self._proc = None
                tail = (base / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"rabbitmq-server exited at start:\n{tail}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"rabbitmq-server did not listen on {self.port}")
            time.sleep(0.2)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            proc.wait(timeout=10)

    def __enter__(self) -> RabbitMqServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
