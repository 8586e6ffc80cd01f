"""Turning what a client sent as ``input`` into a list of texts, with clear errors.

OpenAI's embeddings API accepts a string, a list of strings, a list of token ids or a list of
token-id lists. Token ids are cl100k_base (what the ``openai`` SDK and LangChain send); they
are decoded back to the exact text with the offline table of the ``bpe-openai`` package.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from embedpipe.errors import InvalidInput
from embedpipe.settings import LimitsSettings


def load_cl100k() -> Any:
    """OpenAI's cl100k_base encoding (about 40 ms to load): for token-id inputs and for
    counting an OpenAI model's tokens."""
    with warnings.catch_warnings():
        # bpe-openai 0.1.4 reads its table with the deprecated importlib.resources API.
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        return bpe_openai.get_encoding("cl100k_base")


class TokenDecoder:
    """cl100k_base ids back to text; loaded on first use."""

    @cached_property
    def _encoding(self) -> Any:
        return load_cl100k()

    def decode(self, ids: list[int], index: int | None) -> str:
        where = "input" if index is None else f"input[{index}]"
        limit = int(self._encoding.max_token_value)
        for token in ids:
            if not 0 <= token <= limit:
                raise InvalidInput(
                    f"'{where}' holds token id {token}, outside cl100k_base (0..{limit}).",
                    param="input",
                )
        try:
            raw: bytes = self._encoding.decode_bytes(ids)
        except (KeyError, ValueError) as exc:
            raise InvalidInput(
                f"'{where}' holds a token id that cl100k_base does not define.", param="input"
            ) from exc
        return raw.decode("utf-8", errors="replace")


def _is_token_list(value: list[Any]) -> bool:
    # bool is an int subclass; true/false are not token ids.
    return all(isinstance(item, int) and not isinstance(item, bool) for item in value)


def normalize_input(value: Any, limits: LimitsSettings, decoder: TokenDecoder) -> list[str]:
    """The texts to embed, in order; InvalidInput (param ``input``) for anything malformed.

    Counts and sizes are checked before any token list is decoded, so a request over a limit
    costs no decoding."""
    if isinstance(value, str):
        check_sizes([value], limits, param="input")
        texts = [value]
    elif isinstance(value, list):
        if not value:
            raise InvalidInput("'input' must not be an empty list.", param="input")
        if _is_token_list(value):
            check_sizes([value], limits, param="input")
            texts = [decoder.decode(value, None)]
        else:
            check_sizes(value, limits, param="input")
            texts = [_one_text(item, index, decoder) for index, item in enumerate(value)]
    else:
        raise InvalidInput(
            "'input' must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists.",
            param="input",
        )
    for index, text in enumerate(texts):
        check_text(text, index if len(texts) > 1 else None, limits, param="input")
    return texts


def max_json_values(limits: LimitsSettings) -> int:
    """The most JSON values a valid request body can hold: one per character or token id
    in a string or list (a bound), one per input, and a few fields."""
    return limits.max_request_chars + limits.max_inputs + 64


def check_sizes(items: Sequence[Any], limits: LimitsSettings, *, param: str) -> None:
    """The request's shape within the limits, before anything is decoded or tokenized: the
    number of inputs, each input's length (characters, or ids of a token list: each id is at
    least one character) and the request's total."""
    if len(items) > limits.max_inputs:
        raise InvalidInput(
            f"'{param}' holds {len(items)} items; at most {limits.max_inputs} are allowed.",
            param=param,
        )
    total = 0
    for index, item in enumerate(items):
        size = len(item) if isinstance(item, str | list) else 0
        if size > limits.max_input_chars:
            where = param if len(items) == 1 else f"{param}[{index}]"
            raise InvalidInput(
                f"'{where}' has {size} {'characters' if isinstance(item, str) else 'token ids'}; "
                f"at most {limits.max_input_chars} are allowed (longer texts are cut at the "
                "model's window, but must fit this bound).",
                param=param,
            )
        total += size
    if total > limits.max_request_chars:
        raise InvalidInput(
            f"'{param}' holds {total} characters in all; at most {limits.max_request_chars} "
            "are allowed in one request.",
            param=param,
        )


def _one_text(item: Any, index: int, decoder: TokenDecoder) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and _is_token_list(item):
        return decoder.decode(item, index)
    raise InvalidInput(
        f"'input[{index}]' must be a string or a non-empty list of token ids.", param="input"
    )


def check_text(text: str, index: int | None, limits: LimitsSettings, *, param: str) -> None:
    where = param if index is None else f"{param}[{index}]"
    if not text:
        raise InvalidInput(f"'{where}' must not be empty.", param=param)
    if len(text) > limits.max_input_chars:
        raise InvalidInput(
            f"'{where}' has {len(text)} characters; at most {limits.max_input_chars} are "
            "allowed (longer texts are truncated by tokens, but must fit this bound).",
            param=param,
        )
    if not text.isascii() and not _is_unicode(text):
        raise InvalidInput(
            f"'{where}' is not valid Unicode: it holds an unpaired UTF-16 surrogate.",
            param=param,
        )


def _is_unicode(text: str) -> bool:
    # JSON parsers here refuse unpaired surrogates; this guards every other caller, as the
    # tokenizer and the cache key cannot take them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
