"""A Docker engine for the stack test: the one already running (``DOCKER_HOST`` or the
default socket), or a private ``dockerd`` with its own data root, socket and pid file in a
temporary folder, stopped and removed afterwards.

The private engine runs with ``--bridge=none --iptables=false``: containers reach each other
on the stack's own network and nothing else, and builds use ``--network host`` (pip and apt
reach their registries from the build, as from this machine)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DOCKER_MISSING = (
    "docker and dockerd are missing: `make test-stack` installs them (Debian package docker.io)"
)


@dataclass(frozen=True)
class Docker:
    """The docker CLI (and compose) pointed at one engine."""

    host: str
    started_here: bool

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["docker", *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {done.stdout}{done.stderr}")
        return done

    def answers(self) -> bool:
        try:
            return (
                self.run("version", "--format", "{{.Server.Version}}", check=False).returncode == 0
            )
        except subprocess.TimeoutExpired:
            return False


def _running_engine() -> Docker | None:
    hosts = [os.environ["DOCKER_HOST"]] if os.environ.get("DOCKER_HOST") else []
    if Path("/var/run/docker.sock").exists():
        hosts.append("unix:///var/run/docker.sock")
    for host in hosts:
        docker = Docker(host, started_here=False)
        if docker.answers():
            return docker
    return None


def _dockerd_command(root: Path) -> Sequence[str]:
    return [
        "dockerd",
        # overlay2: a layer is shared, not copied (vfs built the image in 19 min, this in 3).
        "--storage-driver=overlay2",
        "--iptables=false",
        "--bridge=none",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--host=unix://{root / 'docker.sock'}",
        f"--pidfile={root / 'docker.pid'}",
    ]


@contextmanager
def docker_engine(wait_seconds: float = 60) -> Iterator[Docker]:
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        raise AssertionError(DOCKER_MISSING)
    running = _running_engine()
    if running is not None:
        yield running
        return
    # Short: a unix socket path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="ep-stack-", dir="/tmp"))
    log = (root / "dockerd.log").open("wb")
    daemon = subprocess.Popen(
        _dockerd_command(root), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
    )
    docker = Docker(f"unix://{root / 'docker.sock'}", started_here=True)
    try:
        deadline = time.monotonic() + wait_seconds
        while not docker.answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start: {(root / 'dockerd.log').read_text()}")
            time.sleep(0.5)
        yield docker
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        _unmount_under(root)
        shutil.rmtree(root)


def _unmount_under(root: Path) -> None:
    """dockerd leaves its network namespace mounted (exec root/netns/default) after it exits."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    points = [line.split()[1] for line in mounts if len(line.split()) > 1]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", point], check=True, timeout=30)
