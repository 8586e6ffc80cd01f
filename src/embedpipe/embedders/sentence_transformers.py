"""Local sentence-transformers models (the bundled all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedpipe.embedders.base import ModelInfo, Vectors, fingerprint_of
from embedpipe.embedders.model_files import checked_weights, read_json, token_counter
from embedpipe.embedders.window import WindowClipper
from embedpipe.errors import ModelLoadError

log = logging.getLogger("embedpipe.model")


class SentenceTransformerEmbedder:
    """Wraps (never subclasses) ``SentenceTransformer``; one instance per served model."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        *,
        expected_sha256: str | None = None,
        prompt: str = "",
    ) -> None:
        weights_sha256 = checked_weights(name, model_dir, expected_sha256)
        # The hub must never be reached, whatever the caller's environment says.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self._model.eval()
        self._prompt = prompt
        max_tokens = self._model.max_seq_length
        dimensions = self._model.get_embedding_dimension()
        if not max_tokens or not dimensions:
            raise ModelLoadError(f"{model_dir} declares no window or no embedding dimension")
        self._counter = token_counter(self._model.tokenizer.backend_tokenizer, max_tokens)
        self._clipper = WindowClipper(self._model.tokenizer.backend_tokenizer, max_tokens)
        self._info = ModelInfo(
            name=name,
            backend="sentence-transformers",
            dimensions=dimensions,
            max_tokens=max_tokens,
            source=str(model_dir),
            weights_sha256=weights_sha256,
        )
        identity = {
            "weights": weights_sha256,
            "backend": self._info.backend,
            "pooling": read_json(model_dir / "1_Pooling" / "config.json"),
            "modules": read_json(model_dir / "modules.json"),
            "normalize": True,
            "max_tokens": max_tokens,
            "prompt": prompt,
        }
        self._fingerprint = fingerprint_of(identity)
        log.info(
            "loaded model %s from %s (sha256 %s, %d dims, window %d tokens)",
            name,
            model_dir,
            weights_sha256[:12],
            dimensions,
            max_tokens,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        encoded = self._counter.encode_batch([self._prompt + text for text in texts])
        return [len(encoding.ids) for encoding in encoded]

    def clip(self, texts: Sequence[str]) -> list[str]:
        return [self._clipper.clip(text) for text in texts]

    def embed(self, texts: Sequence[str]) -> Vectors:
        vectors = self._model.encode(
            list(texts),
            prompt=self._prompt or None,
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
