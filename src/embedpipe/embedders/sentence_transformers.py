"""Local sentence-transformers models (the bundled all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.embedders.base import PLAIN, ModelInfo, TextForm, Vectors, fingerprint_of
from embedpipe.embedders.local_text import LocalText
from embedpipe.embedders.model_files import checked_weights, read_json
from embedpipe.embedders.prompts import merged_prompts
from embedpipe.embedders.threads import ThreadGovernor
from embedpipe.embedders.tokens import Truncation
from embedpipe.errors import InvalidInput, ModelLoadError
from embedpipe.settings import ModelOptions

log = logging.getLogger("embedpipe.model")


def pooling_includes_prompt(model: Any) -> bool:
    """False when a Pooling module leaves the prompt's tokens out (``include_prompt``)."""
    return all(getattr(module, "include_prompt", True) for module in model)


class SentenceTransformerEmbedder(LocalText):
    """Wraps (never subclasses) ``SentenceTransformer``; one instance per served model."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        *,
        expected_sha256: str | None = None,
        options: ModelOptions | None = None,
        threads: int = 0,
    ) -> None:
        """``threads``: the most intra-op threads a call may use (0: torch's current setting)."""
        options = options or ModelOptions()
        weights_sha256 = checked_weights(name, model_dir, expected_sha256)
        # The hub must never be reached, whatever the caller's environment says.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self._governor = ThreadGovernor(threads or torch.get_num_threads(), torch.set_num_threads)
        self._model.eval()
        try:
            prompts = merged_prompts(
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
        self._init_text(self._model.tokenizer.backend_tokenizer, max_tokens, options, prompts)
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

    def embed(self, texts: Sequence[str], form: TextForm = PLAIN) -> Vectors:
        return self._governor.run(lambda: self._encode(texts, form))

    def _encode(self, texts: Sequence[str], form: TextForm) -> Vectors:
        """On the model's thread only: ``left`` sets the shared tokenizer's side for this
        call (counting uses its own copy).

        What ``SentenceTransformer.encode`` runs for one batch (its length order, its
        ``preprocess``, the modules, normalisation), the same bits, without what it adds to
        every call: a walk over all parameters to find the device and an ``eval()`` over
        all modules, ~1-2.5 ms a call, a lone request's largest cost beside the model
        (docs/benchmarks.md). ``encode`` itself serves a model that truncates dimensions."""
        if not texts:
            return np.empty((0, self._info.dimensions), dtype=np.float32)
        if self._model.truncate_dim is not None:
            return self._encode_with_encode(texts, form)
        import torch

        # encode's order, longest text first (by characters): a row's place in the padded
        # batch is where encode puts it.
        order = np.argsort([-len(text) for text in texts])
        with self._cut_from(form.truncation), torch.inference_mode():
            features = self._model.preprocess([texts[i] for i in order], prompt=form.prompt)
            embeddings = self._model(features)["sentence_embedding"]
            normalized = torch.nn.functional.normalize(embeddings, p=2, dim=1).numpy()
        vectors = np.empty(normalized.shape, dtype=np.float32)
        vectors[order] = normalized
        return vectors

    def _encode_with_encode(self, texts: Sequence[str], form: TextForm) -> Vectors:
        with self._cut_from(form.truncation):
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
        return np.ascontiguousarray(vectors, dtype=np.float32)

    @contextmanager
    def _cut_from(self, side: Truncation) -> Iterator[None]:
        """The model's own tokenizer cuts long texts at ``side`` for one call, then at the
        right again (its default, which every other call expects)."""
        tokenizer = self._model.tokenizer
        tokenizer.truncation_side = side
        try:
            yield
        finally:
            tokenizer.truncation_side = "right"
