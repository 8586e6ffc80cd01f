"""What the service needs from a served model (``ServedModel``) and what the micro-batcher
needs from a local one (``Embedder``).

A local backend is synchronous and called from the model's own thread, never from the event
loop. An upstream API (``embedpipe.upstream``) is a ServedModel whose vectors come from its own
async batcher instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from embedpipe.embedders.prompts import ModelPrompts
from embedpipe.embedders.tokens import TextTokenizer, Truncation

Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class TextForm:
    """How the model sees a text beyond its characters.

    ``prompt``: a prompt kept apart from the text, for a model that leaves the prompt's tokens
    out of its pooling (for the others the prompt is part of the text itself, see
    ``ModelPrompts.in_pooling``). ``truncation``: the end cut past the window."""

    prompt: str = ""
    truncation: Truncation = "right"

    @property
    def key_suffix(self) -> str:
        """What a cache fingerprint needs beyond the model's: empty for the plain form, so
        keys written before there were forms stay valid."""
        suffix = ""
        if self.prompt:
            suffix += "-p" + hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()[:16]
        if self.truncation == "left":
            suffix += "-tl"
        return suffix


PLAIN = TextForm()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a client or operator may know about a served model."""

    name: str
    backend: str
    dimensions: int
    max_tokens: int
    source: str  # a path or an upstream URL, for /stats and `embedpipe models`
    weights_sha256: str | None
    # Vectors come from a paid upstream API: ``dimensions`` is sent there (each size is its
    # own cache entry, not a cut of the full vector) and cache hits are tokens not billed.
    upstream: bool = False
    price_per_million_tokens: float = 0.0


def fingerprint_of(identity: Mapping[str, Any]) -> str:
    """A model's cache fingerprint from everything that changes its vectors (JSON-able):
    equal identities give equal keys, whatever process computes them."""
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ServedModel(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    @property
    def fingerprint(self) -> str:
        """Identity of everything that changes a vector (weights, backend, pooling,
        normalisation, window, prompt): part of every cache key."""
        ...

    @property
    def prompts(self) -> ModelPrompts:
        """The model's prompts by name, its default, and whether it pools over them."""
        ...

    @property
    def tokenizer(self) -> TextTokenizer | None:
        """The model's own tokenizer (``/tokenize``, ``truncate: false``, long texts); None
        for a model that has none here (an upstream API)."""
        ...

    def count_tokens(self, texts: Sequence[str], form: TextForm = PLAIN) -> list[int]:
        """Tokens the model will really see for each text (its prompt included), after
        truncation at its window."""
        ...

    def clip(self, texts: Sequence[str], truncation: Truncation = "right") -> list[str]:
        """The texts cut where the model's window ends (its start, for ``left``), without
        tokenizing all of a long one: each gives the same tokens (and vector) as before (see
        ``embedders/window.py``)."""
        ...


class Embedder(ServedModel, Protocol):
    """A local model: computes vectors itself, on the model's own thread."""

    def embed(self, texts: Sequence[str], form: TextForm = PLAIN) -> Vectors:
        """L2-normalised float32 vectors, one row per text, all in ``form``."""
        ...
