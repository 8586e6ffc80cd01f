"""Run an embedpipe process that must not import torch, transformers or sentence-transformers
(the ONNX backend with its export present): the environment that installs the import guard
of ``tests/import_guard/sitecustomize.py``, and what it saw."""

from __future__ import annotations

import os
from pathlib import Path

GUARD_DIR = Path(__file__).parent / "import_guard"


def torch_free_env(log: Path) -> dict[str, str]:
    """Environment entries for a subprocess whose forbidden imports fail and go to ``log``."""
    log.touch()
    path = [str(GUARD_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), "IMPORT_GUARD_LOG": str(log)}


def forbidden_imports(log: Path) -> str:
    """What the guarded processes tried to import, with where from ("" = nothing)."""
    return log.read_text(encoding="utf-8")
