"""``POST /tokenize`` (TEI's shape) against the reference tokenizer, with the same prompt and
truncation rules as the embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

LONG_TEXT = "Tokenizers cut words into pieces like embeddings and ##ings. " * 60


@pytest.fixture(scope="module")
def http(prompts_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=prompts_server.url, timeout=60) as client:
        yield client


def _tokenize(http: httpx.Client, **body: Any) -> list[list[dict[str, Any]]]:
    reply = http.post("/tokenize", json=body)
    assert reply.status_code == 200, reply.text
    answer: list[list[dict[str, Any]]] = reply.json()
    return answer


def test_ids_tokens_and_offsets_are_the_reference_tokenizers(
    http: httpx.Client, reference_model: Any
) -> None:
    texts = ["Hello, world!", "Ein Satz mit Umlauten: äöü."]
    answer = _tokenize(http, inputs=texts)
    assert len(answer) == 2
    for text, tokens in zip(texts, answer, strict=True):
        encoded = reference_model.tokenizer(text, return_offsets_mapping=True)
        assert [token["id"] for token in tokens] == encoded["input_ids"]
        assert tokens[0] == {
            "id": 101,
            "text": "[CLS]",
            "special": True,
            "start": None,
            "stop": None,
        }
        assert tokens[-1]["text"] == "[SEP]" and tokens[-1]["special"] is True
        for token, (start, stop) in zip(tokens[1:-1], encoded["offset_mapping"][1:-1], strict=True):
            assert token["special"] is False
            assert (token["start"], token["stop"]) == (start, stop)
            assert token["text"] == text[start:stop]
    # A single string is one input; without special tokens, the text's own tokens only.
    plain = _tokenize(http, inputs="Hello, world!", add_special_tokens=False, model=MODEL)
    assert [token["id"] for token in plain[0]] == [t["id"] for t in answer[0][1:-1]]


def test_long_texts_are_cut_as_the_model_cuts_them(
    http: httpx.Client, reference_model: Any
) -> None:
    tokenizer = reference_model.tokenizer
    for side in ("right", "left"):
        for text in (LONG_TEXT, LONG_TEXT * 100):
            tokens = _tokenize(http, inputs=text, truncation_direction=side)[0]
            tokenizer.truncation_side = side
            try:
                want = tokenizer(text, truncation=True, max_length=256)["input_ids"]
            finally:
                tokenizer.truncation_side = "right"
            assert [token["id"] for token in tokens] == want
            for token in tokens:
                if not token["special"]:
                    assert token["text"] == text[token["start"] : token["stop"]]
    reply = http.post("/tokenize", json={"inputs": ["short", LONG_TEXT], "truncate": False})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "inputs"
    count = len(tokenizer(LONG_TEXT)["input_ids"])
    assert f"'inputs[1]' has {count} tokens" in error["message"]


def test_the_prompt_is_tokenized_in_front(
    http: httpx.Client, prompted_reference: dict[str, Any]
) -> None:
    reference = prompted_reference["prompted"]
    for fields in ({"prompt_name": "query"}, {"input_type": "search_query"}):
        tokens = _tokenize(http, inputs="what is it?", model="prompted", **fields)[0]
        assert [t["id"] for t in tokens] == reference.tokenizer("query: what is it?")["input_ids"]
        assert tokens[1]["text"] == "query" and tokens[1]["start"] == 0


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"inputs": "x", "model": "small"}, 400, "model"),  # an upstream model
        ({"inputs": "x", "model": "nope"}, 404, "model"),
        ({"inputs": "x", "model": "prompted", "prompt_name": "nope"}, 400, "prompt_name"),
        ({"inputs": "x", "input_type": "nope"}, 400, "input_type"),
        ({"inputs": []}, 400, "inputs"),
        ({"inputs": ""}, 400, "inputs"),
        ({"inputs": 3}, 400, "inputs"),
        ({"inputs": ["a", 3]}, 400, "inputs"),
        ({"inputs": ["a"] * 2049}, 400, "inputs"),
        ({"inputs": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ({"inputs": "x", "truncate": 1}, 400, "truncate"),
    ],
)
def test_bad_tokenize_requests_get_their_4xx(
    http: httpx.Client, body: dict[str, Any], status: int, param: str
) -> None:
    reply = http.post("/tokenize", json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_tokenize_has_the_keys_budgets_and_size_limits_of_the_other_routes(
    tmp_path: Path,
) -> None:
    """Its tokens are charged to the same budget as the embeddings'."""
    key = "ep-tokenize-test-key-0123456789"
    env = {
        "EMBEDPIPE_DATA_DIR": str(tmp_path / "data"),
        "EMBEDPIPE_REDIS_URL": "",
        "EMBEDPIPE_API_KEYS": key,
        "EMBEDPIPE_RATE_LIMIT_TPM": "400",
        "EMBEDPIPE_LIMITS__MAX_BODY_BYTES": "65536",
    }
    with ServerProcess(env, tmp_path / "server.log").start() as server:
        text = "word " * 200  # 202 tokens with [CLS] and [SEP]
        assert httpx.post(f"{server.url}/tokenize", json={"inputs": text}).status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        reply = httpx.post(f"{server.url}/tokenize", json={"inputs": text}, headers=auth)
        assert reply.status_code == 200, reply.text
        assert len(reply.json()[0]) == 202
        assert int(reply.headers["x-ratelimit-remaining-tokens"]) <= 400 - 202
        embed = {"model": MODEL, "input": text}
        over = httpx.post(f"{server.url}/v1/embeddings", json=embed, headers=auth)
        assert over.status_code == 429, over.text
        big = {"inputs": "a" * 70_000}
        assert httpx.post(f"{server.url}/tokenize", json=big, headers=auth).status_code == 413
