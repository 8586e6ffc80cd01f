"""Local sentence-transformers ``CrossEncoder`` models: relevance scores of (query, document)
pairs, served next to the embedding models (``EMBEDPIPE_EXTRA_MODELS=ranker=cross-encoder:DIR``).

A scorer is an :class:`~embedpipe.embedders.base.Embedder` whose inputs are pairs written as
one string (``embedders/pairs.py``) and whose "vector" is the pair's one logit. So the cache
(4 bytes a pair, keyed by the pair under this model's fingerprint), the single-flight table
and the micro-batcher (pairs grouped by token length, one model thread) serve it unchanged.
The model's activation is applied after the cache (:meth:`CrossEncoderScorer.activate`), so
one entry serves both scores and ``raw_scores``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedpipe.embedders.base import PLAIN, ModelInfo, TextForm, Vectors, fingerprint_of
from embedpipe.embedders.model_files import (
    checked_weights,
    plain_copy,
    read_json,
    token_counter,
)
from embedpipe.embedders.pairs import pair_text, split_pair
from embedpipe.embedders.prompts import ModelPrompts
from embedpipe.embedders.tokens import TextTokenizer, Truncation
from embedpipe.embedders.window import WindowClipper
from embedpipe.errors import ModelLoadError

log = logging.getLogger("embedpipe.model")


class CrossEncoderScorer:
    """Wraps (never subclasses) ``CrossEncoder``; one instance per served cross-encoder."""

    def __init__(self, name: str, model_dir: Path) -> None:
        weights_sha256 = checked_weights(name, model_dir, None)
        # The hub must never be reached, whatever the caller's environment says.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import CrossEncoder

        self._model = CrossEncoder(str(model_dir), device="cpu", local_files_only=True)
        self._model.eval()
        if self._model.num_labels != 1:
            raise ModelLoadError(
                f"{model_dir} has {self._model.num_labels} labels: a reranker has one score"
            )
        max_tokens = int(self._model.max_seq_length or 0)
        if not max_tokens:
            raise ModelLoadError(f"{model_dir} declares no window")
        self._identity = torch.nn.Identity()
        tokenizer = self._model.tokenizer
        # Counts pairs as the library truncates them: longest first, at the window.
        self._counter = token_counter(tokenizer.backend_tokenizer, max_tokens)
        self._plain = plain_copy(tokenizer.backend_tokenizer)
        self._clipper = WindowClipper(self._plain, max_tokens)
        # A clipped text keeps at least this many tokens: the window less a text's specials.
        self._cut_tokens = max_tokens - len(self._plain.encode("").ids)
        activation = self._model.activation_fn
        self._info = ModelInfo(
            name=name,
            backend="cross-encoder",
            dimensions=1,
            max_tokens=max_tokens,
            source=str(model_dir),
            weights_sha256=weights_sha256,
            task="rerank",
        )
        identity = {
            "weights": weights_sha256,
            "backend": self._info.backend,
            "config": read_json(model_dir / "config.json"),
            "max_tokens": max_tokens,
            # Logits are cached, not scores: the activation only names the model here.
            "activation": type(activation).__name__,
        }
        self._fingerprint = fingerprint_of(identity)
        log.info(
            "loaded cross-encoder %s from %s (sha256 %s, window %d tokens, activation %s)",
            name,
            model_dir,
            weights_sha256[:12],
            max_tokens,
            type(activation).__name__,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def prompts(self) -> ModelPrompts:
        """None: a pair is scored as it is (the embedding routes, which take prompts, refuse
        a cross-encoder)."""
        return ModelPrompts()

    @property
    def tokenizer(self) -> TextTokenizer | None:
        return None  # /tokenize serves embedding models only

    def count_tokens(self, texts: Sequence[str], form: TextForm = PLAIN) -> list[int]:
        """Tokens of each pair as the model sees it (specials included, truncated)."""
        encoded = self._counter.encode_batch([split_pair(text) for text in texts])
        return [len(encoding.ids) for encoding in encoded]

    def clip(self, texts: Sequence[str], truncation: Truncation = "right") -> list[str]:
        """Each pair with its query or document cut where the window ends (see
        ``embedders/window.py``), when that keeps the library's truncation: it cuts the longer
        part first, so a cut part (window - 2 tokens or more left) must stay the longer one.
        A pair whose other part holds that many tokens too stays whole."""
        clipped = []
        for text in texts:
            query, document = split_pair(text)
            short_query, short_document = self._clipper.clip(query), self._clipper.clip(document)
            query_cut, document_cut = (
                len(short_query) < len(query),
                len(short_document) < len(document),
            )
            if query_cut or document_cut:
                other = short_document if query_cut else short_query
                if (query_cut and document_cut) or self._tokens_of(other) >= self._cut_tokens:
                    clipped.append(text)
                    continue
            clipped.append(pair_text(short_query, short_document))
        return clipped

    def first_tokens(self, texts: Sequence[str], tokens: int) -> list[str]:
        """Each document cut after its first ``tokens`` tokens (Cohere's
        ``max_tokens_per_doc``); as it is when the window would cut it first anyway."""
        if tokens >= self._info.max_tokens:
            return list(texts)
        return [self._clipper.first_tokens(text, tokens) for text in texts]

    def _tokens_of(self, text: str) -> int:
        return len(self._plain.encode(text, add_special_tokens=False).ids)

    def embed(self, texts: Sequence[str], form: TextForm = PLAIN) -> Vectors:
        """The logit of each pair, as an (n, 1) float32 array (pairs have one form only)."""
        pairs = [split_pair(text) for text in texts]
        logits = self._model.predict(
            pairs,
            batch_size=max(1, len(pairs)),
            activation_fn=self._identity,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(np.asarray(logits, dtype=np.float32).reshape(-1, 1))

    def activate(self, logits: Vectors) -> Vectors:
        """The scores ``CrossEncoder.predict`` gives for these logits (its activation)."""
        import torch

        with torch.inference_mode():
            scores = self._model.activation_fn(torch.from_numpy(np.array(logits, np.float32)))
        return np.asarray(scores.numpy(), dtype=np.float32)
