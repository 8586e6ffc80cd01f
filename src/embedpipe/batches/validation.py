"""Checking a batch input file and cutting its valid requests into chunk files, in bounded
memory whatever the file holds.

The file is read one line at a time, each at most ``max_line_bytes``. Valid requests go to
chunk files and invalid lines to the batch's validation error file as they are found; memory
holds only the open chunk, the first few problems (for the batch's ``errors``) and a 16-byte
digest per ``custom_id``. Reading stops at the first line past a limit (a line too long, one
request too many, one invalid line too many): the batch then fails at once and its
directory is removed, so nothing it wrote stays on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

from embedpipe.batches.objects import BATCH_ENDPOINTS, JsonDict
from embedpipe.batches.storage import write_atomically
from embedpipe.settings import JobsSettings

SHOWN_PROBLEMS = 20  # problems kept for the batch's ``errors`` (all are in the error file)
PREPARE_ERRORS = "prepare.err.jsonl"


def chunk_name(index: int, kind: str) -> str:
    return f"chunk-{index:06d}.{kind}.jsonl"


@dataclass
class Split:
    chunks: int = 0
    total: int = 0  # requests read (lines that are not blank)
    invalid: int = 0
    shown: list[JsonDict] = field(default_factory=list)  # the first problems, with their line
    fatal: JsonDict | None = None  # why the whole batch fails; then nothing is left on disk


def split_file(source: Path, directory: Path, batch_id: str, settings: JobsSettings) -> Split:
    """Validate ``source`` and write its chunk files and error file under ``directory``
    (blocking: call it in a thread). Idempotent: a second run writes the same files."""
    directory.mkdir(parents=True, exist_ok=True)
    split = Split()
    try:
        chunks = _Chunks(directory, settings)
        with source.open("rb") as lines, _Spool(directory / PREPARE_ERRORS) as errors:
            split.fatal = _read(lines, batch_id, settings, split, chunks, errors)
            if split.fatal is None:
                chunks.flush()
                errors.commit()
        split.chunks = chunks.count
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    if split.fatal is not None:
        shutil.rmtree(directory, ignore_errors=True)
    return split


def _read(
    lines: IO[bytes],
    batch_id: str,
    settings: JobsSettings,
    split: Split,
    chunks: _Chunks,
    errors: _Spool,
) -> JsonDict | None:
    """Read every line into ``split``/``chunks``/``errors``; the problem that stopped it."""
    seen: set[bytes] = set()
    number = 0
    # readline with a limit: a 200 MB line is never held whole, only its first bytes.
    while raw := lines.readline(settings.max_line_bytes + 1):
        number += 1
        if len(raw) > settings.max_line_bytes:
            return problem(
                "line_too_long",
                f"Line {number} is longer than {settings.max_line_bytes} bytes; "
                "validation stopped there.",
                line=number,
            )
        if not raw.strip():
            continue
        split.total += 1
        if split.total > settings.max_requests_per_batch:
            return problem(
                "too_many_requests",
                f"The file holds more than {settings.max_requests_per_batch} requests (line "
                f"{number} is one too many); at most {settings.max_requests_per_batch} are "
                "allowed.",
                line=number,
            )
        request, found = parse_line(raw, seen)
        if found is None and request is not None:
            chunks.add(request, number)
            continue
        split.invalid += 1
        if split.invalid > settings.max_invalid_lines:
            return problem(
                "too_many_invalid_lines",
                f"More than {settings.max_invalid_lines} lines are invalid; validation "
                f"stopped at line {number}. The first problems follow.",
                line=number,
            )
        entry = error_entry(batch_id, number, request, found or {})
        errors.write(orjson.dumps(entry) + b"\n")
        if len(split.shown) < SHOWN_PROBLEMS:
            split.shown.append(entry["error"])
    return None


class _Chunks:
    """The open chunk: it closes at ``chunk_size`` requests, ``chunk_max_inputs`` inputs or
    ``max_line_bytes`` bytes, whichever comes first (a request bigger than a limit alone
    makes a chunk of its own)."""

    def __init__(self, directory: Path, settings: JobsSettings) -> None:
        self._directory = directory
        self._settings = settings
        self._pending: list[bytes] = []
        self._inputs = self._bytes = 0
        self.count = 0

    def add(self, request: JsonDict, number: int) -> None:
        data = orjson.dumps(request | {"_line": number}) + b"\n"
        inputs = input_count(request["body"])
        if self._pending and (
            self._inputs + inputs > self._settings.chunk_max_inputs
            or self._bytes + len(data) > self._settings.max_line_bytes
        ):
            self.flush()
        self._pending.append(data)
        self._inputs += inputs
        self._bytes += len(data)
        if len(self._pending) >= self._settings.chunk_size:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            write_atomically(self._directory / chunk_name(self.count, "in"), self._pending)
            self.count += 1
            self._pending, self._inputs, self._bytes = [], 0, 0


class _Spool:
    """A file written as lines are found and renamed into place by ``commit``; without a
    commit it is removed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        self._temp = Path(temp)
        self._out = os.fdopen(handle, "wb")

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._out.close()
        self._temp.unlink(missing_ok=True)

    def write(self, data: bytes) -> None:
        self._out.write(data)

    def commit(self) -> None:
        self._out.flush()
        os.fsync(self._out.fileno())
        os.replace(self._temp, self._path)


def input_count(body: JsonDict) -> int:
    """The texts a request body holds (one for a string or a token-id list; a rerank's
    documents and its query)."""
    documents = body.get("documents")
    if isinstance(documents, list):
        return len(documents) + 1
    value = body.get("input")
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


def parse_line(raw: bytes, seen: set[bytes]) -> tuple[JsonDict | None, JsonDict | None]:
    """The request on a line, or what is wrong with it. ``seen``: digests of the custom_ids
    read so far (digests: an id may be long, 16 bytes each is what memory holds)."""
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        return None, problem("invalid_json", "The line is not valid JSON.")
    if not isinstance(request, dict):
        return None, problem("invalid_request", "The line is not a JSON object.")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, problem("missing_custom_id", "'custom_id' must be a non-empty string.")
    if not _storable(custom_id):
        return None, _UNSTORABLE
    digest = hashlib.blake2b(custom_id.encode(), digest_size=16).digest()
    if digest in seen:
        shown = custom_id if len(custom_id) <= 200 else custom_id[:200] + "…"
        return request, problem("duplicate_custom_id", f"'custom_id' {shown!r} is repeated.")
    seen.add(digest)
    if request.get("method") != "POST":
        return request, problem("invalid_method", "'method' must be \"POST\".")
    url = request.get("url")
    if url not in BATCH_ENDPOINTS:
        return request, problem(
            "invalid_url", f"'url' must be one of {', '.join(BATCH_ENDPOINTS)}."
        )
    if not isinstance(request.get("body"), dict):
        return request, problem("invalid_body", "'body' must be a JSON object.")
    if not _storable(request["body"]):
        return request, _UNSTORABLE
    # An embeddings line keeps no url: chunk files written before reranking stay valid.
    line: JsonDict = {"custom_id": custom_id, "body": request["body"]}
    if url != "/v1/embeddings":
        line["url"] = url
    return line, None


def _storable(value: object) -> bool:
    """Whether orjson, which writes the chunk and result files, can write ``value``: Python's
    json reads unpaired surrogates (not Unicode), integers past 64 bits and nesting deeper
    than orjson's 254 levels, and one such line must not stop the whole batch."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def problem(code: str, message: str, *, line: int | None = None) -> JsonDict:
    found: JsonDict = {"code": code, "message": message}
    if line is not None:
        found["line"] = line
    return found


_UNSTORABLE = problem(
    "invalid_json",
    "The line is not JSON this service can read: it holds an unpaired UTF-16 surrogate, an "
    "integer beyond 64 bits or nesting deeper than 254 levels.",
)


def error_entry(batch_id: str, line: int, request: JsonDict | None, found: JsonDict) -> JsonDict:
    custom_id = request.get("custom_id") if isinstance(request, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) else None
    return {
        "id": f"batch_req_{request_id(batch_id, f'line:{line}')}",
        "custom_id": custom_id,
        "response": None,
        "error": found | {"line": line},
    }


def request_id(batch_id: str, custom_id: str) -> str:
    # Deterministic, so a chunk computed twice writes identical lines.
    return hashlib.sha256(f"{batch_id}:{custom_id}".encode()).hexdigest()[:24]
