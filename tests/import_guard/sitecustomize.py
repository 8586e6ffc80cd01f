"""Test-only, never installed: with this folder on PYTHONPATH and ``IMPORT_GUARD_LOG`` set,
Python's ``site`` runs this file at the start of every process (``embedpipe serve``,
``worker``, ``embed``), and from then on torch, transformers and sentence-transformers cannot
be imported there. Every attempt, direct or by a library probing for them, is appended to
the log with its stack, so a test sees it even when the caller caught the ImportError.
``tests/torch_free.py`` sets it up."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

FORBIDDEN = ("torch", "transformers", "sentence_transformers")


class _ForbiddenImports:
    """A meta path finder, first in line, that refuses the forbidden packages."""

    def __init__(self, log_path: str) -> None:
        self._log_path = log_path

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name.partition(".")[0] not in FORBIDDEN:
            return None
        with open(self._log_path, "a", encoding="utf-8") as log:
            stack = "".join(traceback.format_stack(limit=15))
            log.write(f"process {os.getpid()} imported {name}:\n{stack}\n")
        raise ModuleNotFoundError(f"{name} is forbidden in this process", name=name)


if os.environ.get("IMPORT_GUARD_LOG"):
    sys.meta_path.insert(0, _ForbiddenImports(os.environ["IMPORT_GUARD_LOG"]))
