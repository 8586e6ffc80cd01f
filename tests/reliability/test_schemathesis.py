"""Schemathesis against ``/openapi.json`` of a real server with API keys on: every documented
operation, files and batches included, gets valid and invalid requests (bodies, query, path,
headers, methods), and the answers must be no 5xx, documented statuses, documented content
types and bodies that match their schema. Requests without a key or with a wrong one must be
refused (schemathesis' ``ignored_auth`` check replays successful requests without the key).

Half of the schema-valid requests are steered to things that exist (the served model, an
uploaded file, a real batch, ``purpose: batch``), so the fuzzing reaches past the 404s into the
embedding and batch code; the rest stay random.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core.parameters import ParameterLocation

from embedpipe.api.app import create_app
from embedpipe.settings import Settings
from tests.integration.conftest import MODEL
from tests.reliability.conftest import API_KEY, AUTH, fuzz_settings
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.reliability]


@dataclass(frozen=True)
class Existing:
    """Objects the fuzzer may name: an uploaded batch file and a batch over it."""

    file_id: str
    batch_id: str


@pytest.fixture(scope="module")
def existing(keyed_server: ServerProcess) -> Existing:
    line = (
        '{"custom_id": "c-%d", "method": "POST", "url": "/v1/embeddings", '
        '"body": {"model": "%s", "input": "fuzzing text %d"}}\n'
    )
    content = "".join(line % (i, MODEL, i) for i in range(2)).encode()
    with httpx.Client(base_url=keyed_server.url, headers=AUTH, timeout=30) as http:
        upload = http.post(
            "/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}
        )
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        batch = http.post(
            "/v1/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/embeddings",
                "completion_window": "24h",
            },
        )
        assert batch.status_code == 200, batch.text
    return Existing(file_id=file_id, batch_id=batch.json()["id"])


def _steer(case: schemathesis.Case[Any], known: Existing) -> None:
    """``case`` naming things that exist. Only for schema-valid cases: every value set here is
    valid too, so nothing turns an invalid request into a valid one behind the checks' back."""
    method = case.operation.method.upper()
    path = dict(case.path_parameters or {})
    if "file_id" in path and method != "DELETE":  # deleting it would 404 the rest of the run
        path["file_id"] = known.file_id
    if "batch_id" in path:
        path["batch_id"] = known.batch_id
    if "model" in path:
        path["model"] = MODEL
    case.path_parameters = path
    if isinstance(case.body, dict):
        body = dict(case.body)
        if "input_file_id" in body:
            body |= {"input_file_id": known.file_id, "endpoint": "/v1/embeddings"}
            body["completion_window"] = "24h"
        if "purpose" in body:
            body["purpose"] = "batch"
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        case.body = body


def _document() -> dict[str, Any]:
    """The OpenAPI document of an app with keys on, as ``keyed_server`` serves it (checked
    below). Built here because schemathesis needs it while pytest collects, before any server
    runs."""
    settings = Settings(api_keys=API_KEY, data_dir=Path("not-used-by-create-app"))
    return create_app(settings).openapi()


schema = schemathesis.openapi.from_dict(_document())


def test_the_fuzzed_document_is_the_served_one(keyed_server: ServerProcess) -> None:
    served = httpx.get(f"{keyed_server.url}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == schema.raw_schema


def _every_other(case: schemathesis.Case[Any]) -> bool:
    # A checksum of the case, not a coin: a failing case replays the same way.
    drawn = repr((case.path_parameters, case.query, case.body)).encode()
    return zlib.crc32(drawn) % 2 == 0


@schema.parametrize()
@fuzz_settings(examples=40)
def test_no_request_gets_a_server_error_or_an_undocumented_answer(
    case: schemathesis.Case[Any], keyed_server: ServerProcess, existing: Existing
) -> None:
    positive = case.meta is None or not case.meta.generation.mode.is_negative
    if positive and _every_other(case):
        _steer(case, existing)
    excluded = [
        # Which valid-looking requests succeed depends on the model and the limits (an
        # unknown model, `dimensions` past the model's size, an empty text): 4xx by design.
        checks.positive_data_acceptance,
    ]
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.QUERY):
        # A query "object" goes on the wire as repeated keys, which is a valid query (the
        # last value wins), so the server rightly accepts it.
        excluded.append(checks.negative_data_rejection)
    case.call_and_validate(
        base_url=keyed_server.url, headers=AUTH, excluded_checks=excluded, timeout=60
    )


# -- JSON bodies with any string ------------------------------------------------------------
# Schemathesis draws strings UTF-8 can encode; a client's json can also send unpaired
# surrogates ("\ud800" escapes: valid JSON grammar, not Unicode). So: a valid request for
# each JSON route, with one string in it replaced by any string or any JSON value.

nasty_text = st.text(st.characters(codec=None), max_size=12) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "\u202e\u0301", "🙂", "", " "]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | nasty_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
    max_leaves=8,
)
_EXISTING_FILE = "<an uploaded file>"
_VALID: dict[str, dict[str, Any]] = {
    "/v1/embeddings": {
        "model": MODEL,
        "input": ["one text", "two"],
        "user": "u",
        "input_type": "query",
        "prompt_name": "document",
        "truncation_direction": "left",
        "long_text": "mean",
    },
    "/embed": {"text": "one text", "model": MODEL, "input_type": "document"},
    "/embed/batch": {"texts": ["one", "two"], "model": MODEL},
    "/tokenize": {
        "inputs": ["one text", "two"],
        "model": MODEL,
        "prompt_name": "query",
        "input_type": "search_query",
        "truncation_direction": "right",
    },
    "/v1/batches": {
        "input_file_id": _EXISTING_FILE,
        "endpoint": "/v1/embeddings",
        "completion_window": "24h",
        "metadata": {"team": "search"},
    },
}


def _strings(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where the strings in ``value`` are (dict keys too): paths of keys and indexes."""
    if isinstance(value, str):
        return [at]
    if isinstance(value, list):
        return [path for index, item in enumerate(value) for path in _strings(item, (*at, index))]
    if isinstance(value, dict):
        return [
            path
            for key, item in value.items()
            for path in [(*at, ("key", key)), *_strings(item, (*at, key))]
        ]
    return []


def _replaced(value: Any, at: tuple[Any, ...], new: Any) -> Any:
    if not at:
        return new
    head, rest = at[0], at[1:]
    if isinstance(head, tuple):  # a dict key
        return {(new if key == head[1] else key): item for key, item in value.items()}
    if isinstance(value, list):
        return [_replaced(item, rest, new) if i == head else item for i, item in enumerate(value)]
    return {key: _replaced(item, rest, new) if key == head else item for key, item in value.items()}


@st.composite
def json_requests(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from(sorted(_VALID)))
    body = _VALID[path]
    at = draw(st.sampled_from(_strings(body)))
    new = draw(nasty_text | json_values) if not isinstance(at[-1], tuple) else draw(nasty_text)
    return path, _replaced(body, at, new)


@given(request=json_requests())
@fuzz_settings(examples=80)
def test_any_string_anywhere_in_a_json_body_gets_no_server_error(
    keyed_server: ServerProcess, existing: Existing, request: tuple[str, Any]
) -> None:
    path, body = request
    content = json.dumps(body).replace(_EXISTING_FILE, existing.file_id)  # ASCII, with \u escapes
    reply = httpx.post(
        f"{keyed_server.url}{path}",
        content=content.encode(),
        headers={**AUTH, "content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code < 500, (path, body, reply.text)
    if reply.status_code >= 400:
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    # Whatever was taken can be listed again (a stored string no answer can hold would 500).
    assert httpx.get(f"{keyed_server.url}/v1/batches", headers=AUTH, timeout=60).status_code == 200


def test_the_server_logged_no_unhandled_error(keyed_server: ServerProcess) -> None:
    """After the fuzzing (same module, runs after it): nothing crashed behind a 4xx either,
    e.g. a batch over a fuzzed file, and the server still serves."""
    reply = httpx.post(
        f"{keyed_server.url}/v1/embeddings",
        json={"model": MODEL, "input": "still serving"},
        headers=AUTH,
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    log = keyed_server.log_path.read_text(errors="replace")
    assert '"level":"error"' not in log, keyed_server.logs()
    assert "Traceback" not in log, keyed_server.logs()
