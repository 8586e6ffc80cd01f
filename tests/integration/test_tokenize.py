"""``POST /tokenize`` (TEI's shape) against the reference tokenizer, with the same prompt and
truncation rules as the embeddings."""

from __future__ import annotations

from collections.abc import Iterator
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
