"""Local sentence-transformers models (the bundled all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.embedders.base import ModelInfo, Vectors, fingerprint_of
from embedpipe.embedders.threads import ThreadGovernor
from embedpipe.embedders.window import WindowClipper
from embedpipe.errors import ModelLoadError

log = logging.getLogger("embedpipe.model")

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(model_dir: Path) -> Path:
    for name in _WEIGHT_FILES:
        candidate = model_dir / name
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"no weights ({' or '.join(_WEIGHT_FILES)}) under {model_dir}")


def token_counter(tokenizer: Any, max_tokens: int) -> Any:
    """A private copy of the model's Rust tokenizer, truncating at the window, never padding.

    Counting must not use the model's own tokenizer: a transformers tokenizer call sets
    padding and truncation on the shared Rust object, so a count on the event loop racing an
    ``encode`` on the model thread can leave that batch unpadded ("Unable to create tensor").
    The copy's settings are fixed here once; encoding with it only reads it."""
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    counter.no_padding()
    counter.enable_truncation(max_length=max_tokens)
    return counter


def checked_weights(name: str, model_dir: Path, expected_sha256: str | None) -> str:
    """The sha256 of the model's weights; ModelLoadError when they are not the expected ones."""
    weights = weights_file(model_dir)
    weights_sha256 = file_sha256(weights)
    if expected_sha256 and weights_sha256 != expected_sha256:
        raise ModelLoadError(
            f"weights of {name} at {weights} have sha256 {weights_sha256}, "
            f"expected {expected_sha256}"
        )
    return weights_sha256


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class SentenceTransformerEmbedder:
    """Wraps (never subclasses) ``SentenceTransformer``; one instance per served model."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        *,
        expected_sha256: str | None = None,
        prompt: str = "",
        threads: int = 0,
    ) -> None:
        """``threads``: the most intra-op threads a call may use (0: torch's current setting)."""
        weights_sha256 = checked_weights(name, model_dir, expected_sha256)
        # The hub must never be reached, whatever the caller's environment says.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self._governor = ThreadGovernor(threads or torch.get_num_threads(), torch.set_num_threads)
        self._model.eval()
        self._prompt = prompt
        max_tokens = self._model.max_seq_length
        dimensions = self._model.get_embedding_dimension()
        if not max_tokens or not dimensions:
            raise ModelLoadError(f"{model_dir} declares no window or no embedding dimension")
        self._counter = token_counter(self._model.tokenizer, max_tokens)
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
            "pooling": _read_json(model_dir / "1_Pooling" / "config.json"),
            "modules": _read_json(model_dir / "modules.json"),
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
        return self._governor.run(lambda: self._encode(texts))

    def _encode(self, texts: Sequence[str]) -> Vectors:
        vectors = self._model.encode(
            list(texts),
            prompt=self._prompt or None,
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
