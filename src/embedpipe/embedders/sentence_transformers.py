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

from embedpipe.embedders.base import PLAIN, ModelInfo, TextForm, Vectors, fingerprint_of
from embedpipe.embedders.prompts import ModelPrompts, merged_prompts
from embedpipe.embedders.tokens import TextTokenizer, Truncation
from embedpipe.embedders.window import WindowClipper
from embedpipe.errors import InvalidInput, ModelLoadError
from embedpipe.settings import ModelOptions

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


def long_text_tokenizer(tokenizer: Any, max_tokens: int, options: ModelOptions) -> TextTokenizer:
    """The model's TextTokenizer, with its long-text windows from ``options``."""
    window = options.long_text_window_tokens or max_tokens
    if not 0 < window <= max_tokens or options.long_text_overlap_tokens >= window // 2:
        raise ModelLoadError(
            f"long-text window {window} and overlap {options.long_text_overlap_tokens} do not "
            f"fit a window of {max_tokens} tokens (overlap under half the window)"
        )
    return TextTokenizer(
        tokenizer, max_tokens, window_tokens=window, overlap_tokens=options.long_text_overlap_tokens
    )


def pooling_includes_prompt(model: Any) -> bool:
    """False when a Pooling module leaves the prompt's tokens out (``include_prompt``)."""
    return all(getattr(module, "include_prompt", True) for module in model)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class SentenceTransformerEmbedder:
    """Wraps (never subclasses) ``SentenceTransformer``; one instance per served model."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        *,
        expected_sha256: str | None = None,
        options: ModelOptions | None = None,
    ) -> None:
        options = options or ModelOptions()
        weights_sha256 = checked_weights(name, model_dir, expected_sha256)
        # The hub must never be reached, whatever the caller's environment says.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self._model.eval()
        try:
            self._prompts = merged_prompts(
                self._model.prompts,
                self._model.default_prompt_name,
                options.prompts,
                options.default_prompt_name,
                in_pooling=pooling_includes_prompt(self._model),
            )
        except InvalidInput as exc:
            raise ModelLoadError(f"model {name}: {exc.message}") from None
        max_tokens = self._model.max_seq_length
        dimensions = self._model.get_embedding_dimension()
        if not max_tokens or not dimensions:
            raise ModelLoadError(f"{model_dir} declares no window or no embedding dimension")
        self._counter = token_counter(self._model.tokenizer, max_tokens)
        self._clipper = WindowClipper(self._model.tokenizer.backend_tokenizer, max_tokens)
        self._tokens = long_text_tokenizer(
            self._model.tokenizer.backend_tokenizer, max_tokens, options
        )
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
            # Prompts are chosen per request: each form has its own keys (TextForm.key_suffix).
            "prompt": "",
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

    @property
    def prompts(self) -> ModelPrompts:
        return self._prompts

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokens

    def count_tokens(self, texts: Sequence[str], form: TextForm = PLAIN) -> list[int]:
        encoded = self._counter.encode_batch([form.prompt + text for text in texts])
        return [len(encoding.ids) for encoding in encoded]

    def clip(self, texts: Sequence[str], truncation: Truncation = "right") -> list[str]:
        cut = self._clipper.clip if truncation == "right" else self._clipper.clip_left
        return [cut(text) for text in texts]

    def embed(self, texts: Sequence[str], form: TextForm = PLAIN) -> Vectors:
        """On the model's thread only: ``left`` sets the shared tokenizer's side for this
        call (counting uses its own copy)."""
        tokenizer = self._model.tokenizer
        tokenizer.truncation_side = form.truncation
        try:
            vectors = self._model.encode(
                list(texts),
                # Always explicit: None would apply the model's default_prompt_name behind
                # the cache key's back (requests resolve that default themselves).
                prompt=form.prompt,
                batch_size=max(1, len(texts)),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        finally:
            tokenizer.truncation_side = "right"
        return np.ascontiguousarray(vectors, dtype=np.float32)
