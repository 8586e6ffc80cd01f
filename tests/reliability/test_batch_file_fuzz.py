"""The batch-file fuzzer: whatever a batch input file holds, the batch ends in a final status,
nothing raises, every valid request is answered exactly once and every bad line is an error
entry with its line number.

Files are built from lines of known fate: valid requests, requests the embeddings API refuses
(wrong types for every body field, an unknown model), lines that break the envelope (wrong
types for ``custom_id``/``method``/``url``/``body``, duplicate ``custom_id``s), and raw damage
(truncated lines, bytes that are not UTF-8, a NUL, unpaired surrogates, deep nesting, blank
lines, ``\\r\\n``). :func:`expected` says what each must become, and the batch runs through the
real :class:`BatchProcessor` on the real SQLite store, answering through the real
``create_embeddings`` over a fake model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai import OpenAI

from embedpipe.batches.objects import batch_object, new_batch_id, new_file_id
from embedpipe.batches.processor import BatchProcessor
from embedpipe.batches.storage import Storage
from embedpipe.batches.store_sqlite import SqliteJobStore
from embedpipe.settings import JobsSettings
from tests.integration.batch_helpers import read_lines, wait_for
from tests.integration.conftest import MODEL
from tests.reliability.conftest import API_KEY, Embed, fuzz_settings
from tests.server_process import ServerProcess

pytestmark = pytest.mark.reliability

FAKE = "fake"  # the fake model of fake_app: 8 dimensions


# -- what each line must become ----------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line of a batch file and its fate.

    ``fate``: ``ok`` (answered 200), ``refused`` (answered with ``status``), ``bad`` (an error
    entry with ``code`` and the line number) or ``blank`` (skipped, not counted). ``custom_id``
    is the line's id when it has a usable one: a bad line with one also marks it as seen, so a
    later line with the same id is a duplicate.
    """

    raw: bytes
    fate: str
    custom_id: str | None = None
    code: str | None = None
    status: int | None = None


@dataclass(frozen=True)
class Expected:
    answered: Counter[str]  # custom_id -> 1 for each request answered 200
    refused: Counter[tuple[str, int]]  # (custom_id, status) of each request answered 4xx
    bad: dict[int, str]  # line number -> error code
    total: int  # lines that are not blank


def expected(lines: list[Line]) -> Expected:
    """The batch's outcome: ids seen earlier in the file turn later lines into duplicates."""
    seen: set[str] = set()
    answered: Counter[str] = Counter()
    refused: Counter[tuple[str, int]] = Counter()
    bad: dict[int, str] = {}
    total = 0
    for number, line in enumerate(lines, start=1):
        if line.fate == "blank":
            continue
        total += 1
        if line.custom_id is not None and line.custom_id in seen:
            bad[number] = "duplicate_custom_id"
            continue
        if line.custom_id is not None:
            seen.add(line.custom_id)
        if line.fate == "ok":
            assert line.custom_id is not None
            answered[line.custom_id] += 1
        elif line.fate == "refused":
            assert line.custom_id is not None and line.status is not None
            refused[(line.custom_id, line.status)] += 1
        else:
            assert line.code is not None
            bad[number] = line.code
    return Expected(answered, refused, bad, total)


# -- lines ---------------------------------------------------------------------------------

# A small pool, so that duplicates are common.
ids = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h", "ü-id", "id\x00nul", "id 🙂"])
texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
token_ids = st.lists(st.integers(0, 100_255), min_size=1, max_size=5)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)


def _request(custom_id: Any, body: Any, method: Any = "POST", url: Any = "/v1/embeddings") -> bytes:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body}).encode()


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": FAKE,
        "input": draw(texts | st.lists(texts, min_size=1, max_size=4) | token_ids),
    }
    if draw(st.booleans()):
        body["encoding_format"] = draw(st.sampled_from(["float", "base64"]))
    if draw(st.booleans()):
        body["dimensions"] = draw(st.integers(1, 8))
    if draw(st.booleans()):
        body["user"] = draw(texts)
    return body


# Bodies the embeddings API refuses, with the status it answers (a field of every wrong type).
refused_bodies = st.sampled_from(
    [
        ({"model": FAKE, "input": ""}, 400),
        ({"model": FAKE, "input": []}, 400),
        ({"model": FAKE, "input": 42}, 400),
        ({"model": FAKE, "input": None}, 400),
        ({"model": FAKE, "input": {"a": 1}}, 400),
        ({"model": FAKE, "input": [1.5]}, 400),
        ({"model": FAKE, "input": [True]}, 400),
        ({"model": FAKE, "input": ["a", 1]}, 400),
        ({"model": FAKE, "input": [[["a"]]]}, 400),
        ({"model": FAKE, "input": [-1]}, 400),
        ({"model": FAKE, "input": [2**40]}, 400),
        ({"model": FAKE, "input": ["a", ""]}, 400),
        ({"input": "a"}, 400),
        ({"model": 3, "input": "a"}, 400),
        ({"model": None, "input": "a"}, 400),
        ({"model": "no-such-model", "input": "a"}, 404),
        ({"model": FAKE, "input": "a", "dimensions": 0}, 400),
        ({"model": FAKE, "input": "a", "dimensions": 9}, 400),
        ({"model": FAKE, "input": "a", "dimensions": "eight"}, 400),
        ({"model": FAKE, "input": "a", "dimensions": 1.5}, 400),
        ({"model": FAKE, "input": "a", "encoding_format": "int8"}, 400),
        ({"model": FAKE, "input": "a", "encoding_format": None}, 400),
        ({"model": FAKE, "input": "a", "user": 5}, 400),
    ]
)

not_strings = st.none() | st.booleans() | st.integers() | st.lists(st.integers(), max_size=2)


@st.composite
def lines(draw: st.DrawFn) -> Line:
    custom_id = draw(ids)
    kind = draw(
        st.sampled_from(
            [
                "ok",
                "refused",
                "custom_id",
                "method",
                "url",
                "body",
                "not_object",
                "truncated",
                "not_utf8",
                "nul",
                "surrogate",
                "deep",
                "blank",
            ]
        )
    )
    if kind == "ok":
        return Line(_request(custom_id, draw(valid_bodies())), "ok", custom_id)
    if kind == "refused":
        body, status = draw(refused_bodies)
        return Line(_request(custom_id, body), "refused", custom_id, status=status)
    if kind == "custom_id":
        wrong = draw(not_strings | st.just("") | st.dictionaries(texts, texts, max_size=1))
        return Line(_request(wrong, {"model": FAKE, "input": "x"}), "bad", code="missing_custom_id")
    if kind == "method":
        method = draw(json_values.filter(lambda value: value != "POST"))
        raw = _request(custom_id, {"model": FAKE, "input": "x"}, method=method)
        return Line(raw, "bad", custom_id, code="invalid_method")
    if kind == "url":
        url = draw(json_values.filter(lambda value: value != "/v1/embeddings"))
        raw = _request(custom_id, {"model": FAKE, "input": "x"}, url=url)
        return Line(raw, "bad", custom_id, code="invalid_url")
    if kind == "body":
        body = draw(json_values.filter(lambda value: not isinstance(value, dict)))
        return Line(_request(custom_id, body), "bad", custom_id, code="invalid_body")
    if kind == "not_object":
        value = draw(json_values.filter(lambda value: not isinstance(value, dict)))
        return Line(json.dumps(value).encode(), "bad", code="invalid_request")
    if kind == "truncated":
        whole = _request(custom_id, draw(valid_bodies()))
        cut = draw(st.integers(1, len(whole) - 1))
        return Line(whole[:cut], "bad", code="invalid_json")
    if kind == "not_utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xf8\x88\x80", b"\xe2\x82"]))
        raw = _request(custom_id, {"model": FAKE, "input": "@@"}).replace(b"@@", junk)
        return Line(raw, "bad", code="invalid_json")
    if kind == "nul":
        # A raw NUL is a control character JSON forbids in a string and between tokens.
        raw = _request(custom_id, {"model": FAKE, "input": "@@"})
        at = draw(st.sampled_from([raw.index(b"@@"), raw.index(b":") + 1]))
        return Line(raw[:at] + b"\x00" + raw[at:], "bad", code="invalid_json")
    if kind == "surrogate":
        # An unpaired UTF-16 surrogate, escaped (valid JSON grammar) or UTF-8-encoded (which
        # Python's json reads): not Unicode, so nothing can store or answer it.
        where = draw(st.sampled_from(["custom_id", "input"]))
        surrogate = draw(st.sampled_from([b'"x\\ud800y"', b'"x\\udfffy"', b'"x\xed\xa0\x80y"']))
        if where == "custom_id":
            raw = _request("@@", {"model": FAKE, "input": "x"}).replace(b'"@@"', surrogate)
            return Line(raw, "bad", code="invalid_json")
        raw = _request(custom_id, {"model": FAKE, "input": "@@"}).replace(b'"@@"', surrogate)
        return Line(raw, "bad", custom_id, code="invalid_json")
    if kind == "deep":
        # 300 levels: Python's json reads it, orjson cannot write it, so the line keeps its
        # id; 5,000 and more: no JSON reader here goes that deep, so the id is never read.
        depth = draw(st.sampled_from([300, 5_000, 100_000]))
        nested = b"[" * depth + b"]" * depth
        raw = _request(custom_id, {"model": FAKE, "input": "@@"}).replace(b'"@@"', nested)
        return Line(raw, "bad", custom_id if depth == 300 else None, code="invalid_json")
    return Line(draw(st.sampled_from([b"", b"   ", b"\t", b"\r"])), "blank")


# -- running a batch -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    batch: dict[str, Any]
    output: list[dict[str, Any]]
    errors: list[dict[str, Any]]


def _jsonl(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line]


async def run_batch(content: bytes, embed: Embed, jobs: JobsSettings) -> Outcome:
    """Upload ``content``, then prepare, compute every chunk and finalize, as a runner would."""
    with tempfile.TemporaryDirectory(prefix="batch-fuzz-") as root:
        store = SqliteJobStore(Path(root) / "jobs.sqlite3")
        try:
            storage = Storage(Path(root) / "data")
            processor = BatchProcessor(store, storage, jobs, embed)
            file_id = new_file_id()
            storage.save_upload(file_id, io.BytesIO(content), len(content) + 1)
            batch_id = new_batch_id()
            await store.put_batch(batch_object(batch_id, file_id, "24h", None))
            for index in range(await processor.prepare(batch_id)):
                await processor.run_chunk(batch_id, index)
            batch = await store.get_batch(batch_id)
            assert batch is not None
            output_id, error_id = batch.get("output_file_id"), batch.get("error_file_id")
            return Outcome(
                batch,
                _jsonl(storage.file_path(output_id) if output_id else None),
                _jsonl(storage.file_path(error_id) if error_id else None),
            )
        finally:
            await store.close()


def check(outcome: Outcome, want: Expected, dimensions: int = 8) -> None:
    batch = outcome.batch
    if not want.answered and not want.refused:  # nothing valid to run: the batch fails
        assert batch["status"] == "failed", batch
        problems = batch["errors"]["data"]
        if not want.bad:
            assert [problem["code"] for problem in problems] == ["empty_file"]
        else:
            shown = {problem["line"]: problem["code"] for problem in problems}
            assert shown == dict(sorted(want.bad.items())[:20])
        return
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {
        "total": want.total,
        "completed": sum(want.answered.values()),
        "failed": sum(want.refused.values()) + len(want.bad),
    }
    assert Counter(entry["custom_id"] for entry in outcome.output) == want.answered
    for entry in outcome.output:
        assert entry["error"] is None
        assert entry["response"]["status_code"] == 200
        for item in entry["response"]["body"]["data"]:
            assert isinstance(item["embedding"], str) or len(item["embedding"]) <= dimensions
    refused = [entry for entry in outcome.errors if entry["response"] is not None]
    got_refused = Counter(
        (entry["custom_id"], entry["response"]["status_code"]) for entry in refused
    )
    assert got_refused == want.refused
    for entry in refused:
        assert set(entry["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    bad = [entry for entry in outcome.errors if entry["response"] is None]
    assert {entry["error"]["line"]: entry["error"]["code"] for entry in bad} == want.bad
    assert len(bad) == len(want.bad)  # each bad line once


def join(items: list[Line], ending: bytes, final_newline: bool) -> bytes:
    text = ending.join(line.raw for line in items)
    return text + ending if final_newline and items else text


# -- the fuzzer ----------------------------------------------------------------------------


@given(
    items=st.lists(lines(), max_size=25),
    ending=st.sampled_from([b"\n", b"\r\n"]),
    final_newline=st.booleans(),
    chunk_size=st.integers(1, 7),
)
@fuzz_settings(examples=60)
async def test_any_batch_file_ends_in_a_final_status_with_every_line_accounted_for(
    embed: Embed, items: list[Line], ending: bytes, final_newline: bool, chunk_size: int
) -> None:
    content = join(items, ending, final_newline)
    outcome = await run_batch(content, embed, JobsSettings(chunk_size=chunk_size))
    check(outcome, expected(items))


# -- hand-written nasty files --------------------------------------------------------------


def nasty_lines() -> list[Line]:
    """One of everything, a 5 MB line included."""
    huge = "x" * (5 * 1024 * 1024)
    return [
        Line(_request("one", {"model": FAKE, "input": "hello"}), "ok", "one"),
        Line(b"", "blank"),
        Line(_request("huge", {"model": FAKE, "input": huge}), "refused", "huge", status=400),
        Line(_request("one", {"model": FAKE, "input": "again"}), "bad", "one"),  # duplicate
        Line(b'{"custom_id": "cut", "method": "POST", "url": "/v1/emb', "bad", code="invalid_json"),
        Line(b"\xff\xfe not utf-8", "bad", code="invalid_json"),
        Line(b'{"custom_id": "nul\x00", "method": "POST"}', "bad", code="invalid_json"),
        Line(_request("two", {"model": FAKE, "input": ["a", "b"]}), "ok", "two"),
        Line(b"[" * 50_000 + b"]" * 50_000, "bad", code="invalid_json"),
        Line(b'"just a string"', "bad", code="invalid_request"),
        Line(_request(7, {"model": FAKE, "input": "x"}), "bad", code="missing_custom_id"),
        Line(_request("m", {"model": FAKE, "input": "x"}, method="GET"), "bad", "m"),
        Line(_request("u", {"model": FAKE, "input": "x"}, url="/v1/chat"), "bad", "u"),
        Line(_request("b", "not an object"), "bad", "b"),
        Line(_request("r", {"model": "nope", "input": "x"}), "refused", "r", status=404),
        Line(b"   ", "blank"),
    ]


def _codes(items: list[Line]) -> list[Line]:
    # The hand-written bad lines with an id name their code here, by position.
    codes = {3: "duplicate_custom_id", 11: "invalid_method", 12: "invalid_url", 13: "invalid_body"}
    return [dataclasses.replace(line, code=codes.get(i, line.code)) for i, line in enumerate(items)]


@pytest.mark.parametrize(
    "content",
    [b"", b"\n\n  \n", b"\r\n\r\n", b"\x00", b"\xef\xbb\xbf", b"[" * 100_000],
    ids=["empty", "blank lines", "crlf blank lines", "a nul", "a bom alone", "deep"],
)
async def test_a_file_without_requests_fails_the_batch_cleanly(
    embed: Embed, content: bytes
) -> None:
    outcome = await run_batch(content, embed, JobsSettings())
    assert outcome.batch["status"] == "failed"
    problems = outcome.batch["errors"]["data"]
    assert problems and all(problem["message"] for problem in problems)


async def test_a_file_of_every_nasty_thing(embed: Embed) -> None:
    items = _codes(nasty_lines())
    for ending in (b"\n", b"\r\n"):
        outcome = await run_batch(join(items, ending, True), embed, JobsSettings(chunk_size=2))
        check(outcome, expected(items))


@pytest.mark.model
@pytest.mark.server
def test_the_nasty_file_through_a_real_server_and_the_sdk(keyed_server: ServerProcess) -> None:
    served = f'"{MODEL}"'.encode()
    items = [
        dataclasses.replace(line, raw=line.raw.replace(f'"{FAKE}"'.encode(), served))
        for line in _codes(nasty_lines())
    ]
    want = expected(items)
    with OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0) as sdk:
        upload = sdk.files.create(file=("nasty.jsonl", join(items, b"\r\n", True)), purpose="batch")
        batch = sdk.batches.create(
            input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        done = wait_for(sdk, batch.id, ("completed", "failed", "expired", "cancelled"), 120)
        outcome = Outcome(
            done.model_dump(),
            read_lines(sdk, done.output_file_id),
            read_lines(sdk, done.error_file_id),
        )
    check(outcome, want, dimensions=384)
