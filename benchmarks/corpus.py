"""A corpus of real English text that ships with every Python: the standard library's
docstrings. Deterministic, offline, with a long tail of lengths."""

from __future__ import annotations

import importlib
import inspect
import warnings

_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "functools",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "zipfile",
)


def _docstrings() -> list[str]:
    found: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            module = importlib.import_module(name)
            for _, member in sorted(vars(module).items()):
                doc = inspect.getdoc(member) if callable(member) else None
                if doc:
                    found.append(doc)
    return found


def load_corpus(size: int) -> list[str]:
    """``size`` unique docstrings (at least 20 characters), in a fixed order."""
    seen: dict[str, None] = {}
    for doc in _docstrings():
        text = " ".join(doc.split())
        if len(text) >= 20:
            seen.setdefault(text, None)
    texts = list(seen)
    if len(texts) < size:
        raise ValueError(f"only {len(texts)} unique paragraphs available, {size} asked")
    # Interleave from across the list so every slice mixes modules (and lengths).
    stride = len(texts) // size
    return [texts[index * stride] for index in range(size)]
