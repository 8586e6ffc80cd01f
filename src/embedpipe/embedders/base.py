"""The Embedder protocol: what the batcher and the service need from a model backend.

A backend is synchronous and called from the model's own thread, never from the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a client or operator may know about a served model."""

    name: str
    backend: str
    dimensions: int
    max_tokens: int
    source: str  # a path or an upstream URL, for /stats and `embedpipe models`
    weights_sha256: str | None


class Embedder(Protocol):
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

    def embed(self, texts: Sequence[str]) -> Vectors:
        """L2-normalised float32 vectors, one row per text."""
        ...
