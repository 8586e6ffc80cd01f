"""The images of the stack test. This machine kind has no image registry, so the upstream
images the compose file names (python, nginx, redis, prometheus) are replaced by stand-ins
built from Debian's packages: mmdebstrap makes a root filesystem, ``docker import`` turns it
into a base, and a few lines per service (tests/stack/images/) make it behave like the
official image. The embedpipe image itself is built from deploy/Dockerfile, as users do, on
the python stand-in."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.stack.engine import Docker

HERE = Path(__file__).resolve().parent
# The python stand-in is python3 (3.11 on bookworm) with venv; the services' base holds the
# three servers (nginx-light, redis-server, prometheus) and wget for their health checks.
ROOTFS_PACKAGES = {
    "python": ["python3", "python3-venv", "ca-certificates"],
    "services": [
        "ca-certificates",
        "wget",
        "nginx-light",
        "redis-server",
        "redis-tools",
        "prometheus",
    ],
}
SERVICE_BASE = {
    "python": "python",
    "nginx": "services",
    "redis": "services",
    "prometheus": "services",
}
MMDEBSTRAP_MISSING = "mmdebstrap is missing: `make test-stack` installs it (Debian package)"


@dataclass
class Images:
    """Image names by role (python, nginx, redis, prometheus, embedpipe) and every image made."""

    tag: str
    names: dict[str, str] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)
    build_seconds: float = 0.0


def pip_configuration() -> dict[str, str]:
    """This machine's pip settings (``pip config list``): where its CA bundle and its local
    wheels are. The python stand-in carries both, so pip inside a build finds what pip here
    finds (the CPU torch wheel among them)."""
    done = subprocess.run(
        ["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    )
    settings: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.rpartition(".")[2]] = value.strip().strip("'\"")
    return settings


def _python_context(context: Path, pip: Mapping[str, str]) -> None:
    """Files laid over the python stand-in's root: pip.conf, the CA bundle, the wheels."""
    root = context / "pip"
    lines = ["[global]", "default-timeout = 180"]
    cert = pip.get("cert")
    if cert and Path(cert).is_file():
        target = root / "etc/ssl/certs/ca-certificates.crt"
        target.parent.mkdir(parents=True)
        shutil.copyfile(cert, target)
        lines.append("cert = /etc/ssl/certs/ca-certificates.crt")
    links = [Path(p) for p in pip.get("find-links", "").split() if Path(p).is_dir()]
    for n, folder in enumerate(links):
        shutil.copytree(folder, root / f"opt/wheels{n}")
    if links:
        lines.append("find-links = " + " ".join(f"/opt/wheels{n}" for n in range(len(links))))
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/pip.conf").write_text("\n".join(lines) + "\n")


def _rootfs(kind: str, work: Path) -> Path:
    tar = work / f"{kind}.tar"
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(ROOTFS_PACKAGES[kind])}",
            "bookworm",
            str(tar),
        ],
        check=True,
        capture_output=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    return tar


def _build(docker: Docker, context: Path, dockerfile: Path, tag: str, **args: str) -> None:
    build_args = [
        item for name, value in args.items() for item in ("--build-arg", f"{name}={value}")
    ]
    docker.run(
        "build",
        "--network",
        "host",
        "--file",
        str(dockerfile),
        *build_args,
        "--tag",
        tag,
        str(context),
        timeout=1800,
    )


def build_stand_ins(docker: Docker, work: Path, images: Images) -> None:
    if shutil.which("mmdebstrap") is None:
        raise AssertionError(MMDEBSTRAP_MISSING)
    with ThreadPoolExecutor(max_workers=2) as pool:
        kinds = list(ROOTFS_PACKAGES)
        tars = dict(zip(kinds, pool.map(lambda k: _rootfs(k, work), kinds), strict=True))
    bases = {}
    for kind, tar in tars.items():
        bases[kind] = f"embedpipe-stack/debian-{kind}:{images.tag}"
        docker.run("import", str(tar), bases[kind], timeout=600)
        images.made.append(bases[kind])
        tar.unlink()
    pip = pip_configuration()
    for role, kind in SERVICE_BASE.items():
        context = work / f"context-{role}"
        context.mkdir()
        if role == "python":
            _python_context(context, pip)
        name = f"embedpipe-stack/{role}:{images.tag}"
        _build(docker, context, HERE / "images" / f"{role}.Dockerfile", name, BASE=bases[kind])
        images.made.append(name)
        images.names[role] = name
        shutil.rmtree(context)


def build_embedpipe(docker: Docker, repository: Path, images: Images, torch_index: str) -> None:
    """deploy/Dockerfile from the repository root, as the README's `docker build` line does."""
    name = f"embedpipe:{images.tag}"
    started = time.monotonic()
    _build(
        docker,
        repository,
        repository / "deploy" / "Dockerfile",
        name,
        PYTHON_IMAGE=images.names["python"],
        TORCH_INDEX_URL=torch_index,
    )
    images.build_seconds = time.monotonic() - started
    images.made.append(name)
    images.names["embedpipe"] = name


def build_slim(docker: Docker, repository: Path, images: Images) -> float:
    """deploy/slim.Dockerfile from the full image built before, as the README's two
    `docker build` lines do; named as deploy/compose.slim.yaml names it. The seconds taken."""
    name = f"embedpipe-slim:{images.tag}"
    started = time.monotonic()
    _build(
        docker,
        repository,
        repository / "deploy" / "slim.Dockerfile",
        name,
        PYTHON_IMAGE=images.names["python"],
        FULL_IMAGE=images.names["embedpipe"],
    )
    images.made.append(name)
    images.names["embedpipe-slim"] = name
    return time.monotonic() - started


def image_bytes(docker: Docker, name: str) -> int:
    return int(docker.run("image", "inspect", "--format", "{{.Size}}", name).stdout)


def copied_layer_bytes(docker: Docker, name: str) -> int:
    """The bytes of ``name``'s own COPY layers: in the python stand-in, this machine's pip
    settings and wheel folder, which the official python image does not carry."""
    done = docker.run(
        "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", name
    )
    rows = (line.split("\t", 1) for line in done.stdout.splitlines() if "\t" in line)
    return sum(int(size) for size, created_by in rows if "COPY" in created_by)


@contextmanager
def removed_afterwards(docker: Docker, images: Images) -> Iterator[Images]:
    try:
        yield images
    finally:
        for name in reversed(images.made):
            docker.run("image", "rm", "--force", name, check=False)
        if docker.started_here:  # on an engine of someone else's, only what it made itself
            # The builds' intermediate layers (the legacy builder keeps them, untagged).
            docker.run("image", "prune", "--force", check=False, timeout=300)
            docker.run("builder", "prune", "--force", check=False, timeout=300)
