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
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]

# What a model computes: vectors (``embed``; it also reranks by cosine) or the relevance
# scores of (query, document) pairs (``rerank``, a cross-encoder).
Task = Literal["embed", "rerank"]


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
    task: Task = "embed"


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

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model will really see for each text, after truncation at its window."""
        ...

    def clip(self, texts: Sequence[str]) -> list[str]:
        """The texts cut where the model's window ends, without tokenizing all of a long one:
        each gives the same tokens (and vector) as before (see ``embedders/window.py``)."""
        ...


class Embedder(ServedModel, Protocol):
    """A local model: computes vectors itself, on the model's own thread."""

    def embed(self, texts: Sequence[str]) -> Vectors:
        """L2-normalised float32 vectors, one row per text."""
        ...
