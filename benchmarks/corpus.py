"""A corpus of real English text that ships with every CPython, so the benchmark needs no
network and gives the same texts on every machine with the same Python:

* short texts: the paragraphs of the Python documentation that ``help()`` reads
  (``pydoc_data.topics``) and the docstrings of standard-library functions, classes and
  methods;
* long texts: runs of 4-10 consecutive documentation paragraphs, as a retrieval system would
  chunk a page.

Code samples, grammar rules and other non-prose are left out. One text in nine is long, which
gives a long tail like real traffic's (on Python 3.11 with all-MiniLM-L6-v2's tokenizer:
mean ~82 tokens, p50 ~37, p90 ~205, 8% beyond the 256-token window). The order is fixed and
every slice mixes short and long texts alike, so workloads can take disjoint slices.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import warnings
from collections.abc import Iterator

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
LONG_EVERY = 9  # one text in nine is a multi-paragraph section
_MIN_CHARS = 20
_MIN_PROSE = 0.85  # share of letters and spaces: below it, a paragraph is code or a table


def _prose(paragraph: str) -> str | None:
    """The paragraph on one line, or None when it is not English prose."""
    text = " ".join(paragraph.split())
    if len(text) < _MIN_CHARS or text.startswith(">>>") or "::=" in text:
        return None
    letters = sum(char.isalpha() or char == " " for char in text)
    return text if letters / len(text) >= _MIN_PROSE else None


def _documentation_pages() -> list[list[str]]:
    """The prose paragraphs of each page of the Python documentation ``help()`` shows."""
    from pydoc_data.topics import topics

    pages = []
    for name in sorted(topics):
        paragraphs = (_prose(p) for p in re.split(r"\n\s*\n", topics[name]))
        pages.append([p for p in paragraphs if p])
    return pages


def _sections(pages: list[list[str]]) -> Iterator[str]:
    """Runs of 4-10 consecutive paragraphs of one page, overlapping like sliding chunks."""
    for paragraphs in pages:
        for start in range(0, len(paragraphs) - 4, 3):
            length = 4 + start % 7
            if start + length <= len(paragraphs):
                yield " ".join(paragraphs[start : start + length])


def _docstrings() -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some modules warn about deprecated members
        for name in _MODULES:
            module = importlib.import_module(name)
            for _, member in sorted(vars(module).items()):
                if not callable(member):
                    continue
                yield inspect.getdoc(member) or ""
                if inspect.isclass(member):
                    for _, method in sorted(vars(member).items()):
                        if callable(method):
                            yield inspect.getdoc(method) or ""


@functools.cache
def corpus() -> tuple[str, ...]:
    """Every text of the corpus, unique, in its fixed order."""
    pages = _documentation_pages()
    short = dict.fromkeys(p for page in pages for p in page)
    short.update(dict.fromkeys(t for t in map(_prose, _docstrings()) if t))
    long = [text for text in dict.fromkeys(_sections(pages)) if text not in short]
    shuffle = random.Random(0).shuffle
    short_texts = list(short)
    shuffle(short_texts)
    shuffle(long)
    texts: list[str] = []
    short_iter, long_iter = iter(short_texts), iter(long)
    for index in range(len(long) * LONG_EVERY):
        source = long_iter if index % LONG_EVERY == LONG_EVERY - 1 else short_iter
        text = next(source, None)
        if text is None:
            break
        texts.append(text)
    return tuple(texts)


def load_corpus(size: int, offset: int = 0) -> list[str]:
    """``size`` unique texts starting at ``offset``: disjoint slices never share a text."""
    texts = corpus()
    if offset + size > len(texts):
        raise ValueError(f"the corpus holds {len(texts)} texts; {offset + size} were asked")
    return list(texts[offset : offset + size])
