"""Infinity 0.0.78 (michaelfeil/infinity), the torch engine on the CPU, serving the bundled
model's directory from the venv ``make bench-infinity`` makes (its pins cannot live beside
embedpipe's). It speaks OpenAI's ``/v1/embeddings`` with ``--url-prefix /v1``, so the same load
generator drives it. It has no cache: every text is computed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks.load import MODEL
from benchmarks.processes import ChildServer

VENV = Path(".venv-infinity")
INSTALL_LOG = Path("benchmarks/results/infinity-install.log")


def executable(root: Path) -> Path:
    return root / VENV / "bin" / "infinity_emb"


def installed_version(root: Path) -> str | None:
    """The infinity-emb version in its venv, or None when it is not there."""
    python = root / VENV / "bin" / "python"
    if not executable(root).exists() or not python.exists():
        return None
    found = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('infinity-emb'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or None


def why_missing(root: Path) -> str:
    """The page's note when Infinity cannot be measured: the end of its install log."""
    log = root / INSTALL_LOG
    tail = ""
    if log.exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        lines = [line for line in lines if "is ignored: it is neither" not in line]
        tail = " ".join(lines[-3:])[-400:]
    return (
        f"not installed (`make bench-infinity` failed or was not run){': ' + tail if tail else ''}"
    )


def infinity_server(root: Path, model_dir: Path, log_path: Path) -> ChildServer:
    command = [
        str(executable(root)),
        "v2",
        "--model-id",
        str(model_dir),
        "--served-model-name",
        MODEL,
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--url-prefix",
        "/v1",
    ]
    env = {
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        # Its cache folder goes beside the log, not into the working directory.
        "INFINITY_HOME": str(log_path.parent),
    }
    return ChildServer("Infinity", command, "/health", log_path, env, start_timeout=300)
