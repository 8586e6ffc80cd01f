"""Fakes that stand in for a model where the real one would only make a test slower."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np

from embedpipe.embedders import ModelInfo, Vectors


class FakeEmbedder:
    """Deterministic unit vectors from a hash of the text; records every model call.

    ``gate`` (when set) holds each call until the test releases it, to build up a queue.
    """

    def __init__(self, name: str = "fake", dimensions: int = 8, fail_on: str | None = None):
        self._info = ModelInfo(
            name=name,
            backend="fake",
            dimensions=dimensions,
            max_tokens=256,
            source="memory",
            weights_sha256=None,
        )
        self.calls: list[list[str]] = []
        self.gate: threading.Event | None = None
        self.fail_on = fail_on

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def fingerprint(self) -> str:
        return f"fake-{self._info.name}"

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [min(len(text.split()) + 2, self._info.max_tokens) for text in texts]

    def embed(self, texts: Sequence[str]) -> Vectors:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.calls.append(list(texts))
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("secret internal detail")
        return np.stack([vector_for(text, self._info.dimensions) for text in texts])


def vector_for(text: str, dimensions: int = 8) -> Vectors:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    normalized: Vectors = vector / np.linalg.norm(vector)
    return normalized
