"""An upstream model as the service sees it: its name, size, cache identity and token counts.

Tokens are counted offline with cl100k_base (``bpe-openai``), the tokenizer of OpenAI's
embedding models: what ``usage`` reports, what rate limits charge and what a call may hold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from embedpipe.embedders.base import PLAIN, ModelInfo, TextForm, fingerprint_of
from embedpipe.embedders.prompts import ModelPrompts
from embedpipe.embedders.tokens import Truncation
from embedpipe.errors import InvalidInput
from embedpipe.inputs import load_cl100k

log = logging.getLogger("embedpipe.upstream")

BACKEND = "openai"

# OpenAI's published full sizes: /v1/models and `dimensions` checks are right before the first
# call. Any other upstream model learns its size from its first answer.
KNOWN_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


def public_url(url: str) -> str:
    """``url`` without credentials, query or fragment: safe for /stats, logs and cache keys."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


# The longest cl100k_base token, in bytes (measured over its whole table).
_CL100K_LONGEST_TOKEN_BYTES = 128


class Cl100kCounter:
    """cl100k_base token counts; the table loads on first use."""

    @cached_property
    def _encoding(self) -> Any:
        return load_cl100k()

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self._encoding.encode_ordinary_batch(list(texts))]


class UpstreamModel:
    """A model served by an OpenAI-compatible API: a ``ServedModel`` whose vectors come from
    :class:`~embedpipe.upstream.batcher.UpstreamBatcher`.

    >>> model = UpstreamModel("small", "text-embedding-3-small", "https://api.openai.com/v1")
    >>> model.info.dimensions, model.count_tokens(["hello world"])
    (1536, [2])
    """

    def __init__(
        self,
        name: str,
        upstream_model: str,
        base_url: str,
        *,
        dimensions: int = 0,
        max_input_tokens: int = 8192,
        price_per_million_tokens: float = 0.0,
        counter: Cl100kCounter | None = None,
        prompts: ModelPrompts | None = None,
    ) -> None:
        self._prompts = prompts or ModelPrompts()
        self.upstream_model = upstream_model
        self._counter = counter or Cl100kCounter()
        self._info = ModelInfo(
            name=name,
            backend=BACKEND,
            dimensions=dimensions or KNOWN_DIMENSIONS.get(upstream_model, 0),
            max_tokens=max_input_tokens,
            source=f"{public_url(base_url)} ({upstream_model})",
            weights_sha256=None,
            upstream=True,
            price_per_million_tokens=price_per_million_tokens,
        )
        # The same model name at another provider may give other vectors; the key never is.
        identity = {"backend": BACKEND, "base_url": public_url(base_url), "model": upstream_model}
        self._fingerprint = fingerprint_of(identity)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def prompts(self) -> ModelPrompts:
        return self._prompts

    @property
    def tokenizer(self) -> None:
        """None: the upstream's tokenizer is not this process's to run."""
        return None

    def count_tokens(self, texts: Sequence[str], form: TextForm = PLAIN) -> list[int]:
        """cl100k tokens per text; a text over the upstream's window is a 400 here, before
        any call (the upstream would refuse it, failing the texts it shares a call with)."""
        counts = self._counter.count([form.prompt + text for text in texts])
        limit = self._info.max_tokens
        for index, count in enumerate(counts):
            if count > limit:
                where = "input" if len(counts) == 1 else f"input[{index}]"
                raise InvalidInput(
                    f"'{where}' has {count} tokens; model '{self._info.name}' accepts at most "
                    f"{limit} per input.",
                    param="input",
                    code="context_length_exceeded",
                )
        return counts

    def clip(self, texts: Sequence[str], truncation: Truncation = "right") -> list[str]:
        """The texts as they are (the upstream refuses what is over its window, it never cuts),
        after refusing any so long it must be over the window, before it is tokenized: a
        cl100k token is at most 128 bytes, so a text has at least len/128 tokens."""
        limit = self._info.max_tokens
        for index, text in enumerate(texts):
            if len(text) > limit * _CL100K_LONGEST_TOKEN_BYTES:
                where = "input" if len(texts) == 1 else f"input[{index}]"
                raise InvalidInput(
                    f"'{where}' has {len(text)} characters, more than {limit} tokens; model "
                    f"'{self._info.name}' accepts at most {limit} per input.",
                    param="input",
                    code="context_length_exceeded",
                )
        return list(texts)

    def accept_dimensions(self, width: int) -> bool:
        """Whether full-size vectors ``width`` wide fit this model: the first answer of a
        model of unknown size teaches it its size."""
        if self._info.dimensions == 0:
            self._info = replace(self._info, dimensions=width)
            log.info("upstream model %s answers %d-dimensional vectors", self._info.name, width)
            return True
        return width == self._info.dimensions
