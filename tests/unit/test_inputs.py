from __future__ import annotations

from typing import Any

import pytest

from embedpipe.errors import InvalidInput
from embedpipe.inputs import TokenDecoder, normalize_input
from embedpipe.settings import LimitsSettings

LIMITS = LimitsSettings(max_inputs=4, max_input_chars=50)
DECODER = TokenDecoder()


def _cl100k(text: str) -> list[int]:
    ids: list[int] = DECODER._encoding.encode(text)
    return ids


def test_string_and_list_of_strings() -> None:
    assert normalize_input("hi", LIMITS, DECODER) == ["hi"]
    assert normalize_input(["a", "b"], LIMITS, DECODER) == ["a", "b"]


def test_token_ids_decode_back_to_the_exact_text() -> None:
    texts = ["Hello world, héllo 🙂", "  spaces\tand\nnewlines  "]
    assert normalize_input(_cl100k(texts[0]), LIMITS, DECODER) == texts[:1]
    assert normalize_input([_cl100k(text) for text in texts], LIMITS, DECODER) == texts


def test_mixed_strings_and_token_lists() -> None:
    assert normalize_input(["plain", _cl100k("tokens")], LIMITS, DECODER) == ["plain", "tokens"]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "must not be empty"),
        ([], "must not be an empty list"),
        ([""], "must not be empty"),
        (["ok", ""], "input[1]"),
        (42, "must be a string"),
        (None, "must be a string"),
        ({"text": "x"}, "must be a string"),
        ([1.5], "must be a string or a non-empty list of token ids"),
        ([True, False], "must be a string or a non-empty list of token ids"),
        ([[]], "non-empty list of token ids"),
        (["a", 3], "input[1]"),
        ([-1], "outside cl100k_base"),
        ([10**9], "outside cl100k_base"),
        ([100256], "does not define"),
        (["a"] * 5, "at most 4"),
        ("x" * 51, "at most 50"),
    ],
)
def test_malformed_input_is_rejected_with_a_clear_message(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidInput) as error:
        normalize_input(value, LIMITS, DECODER)
    assert fragment in error.value.message
    assert error.value.param == "input"
