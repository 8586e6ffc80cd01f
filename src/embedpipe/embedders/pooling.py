"""Sentence vectors from a transformer's token vectors, as sentence-transformers' Pooling
module computes them, in numpy (the ONNX backend runs without torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from embedpipe.embedders.base import Vectors

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]


def pool(token_vectors: Floats, attention_mask: Ints, modes: Sequence[str]) -> Vectors:
    """``token_vectors`` (batch, tokens, hidden) → (batch, hidden x modes), the modes
    concatenated in the order given (``model_files.POOLING_MODES``); padding never counts."""
    mask = attention_mask[:, :, None].astype(np.float32)
    parts: list[Floats] = []
    for mode in modes:
        if mode == "cls_token":
            parts.append(token_vectors[:, 0])
        elif mode == "max_tokens":
            # As sentence-transformers does: padded positions are pushed far below any value.
            parts.append(np.where(mask > 0, token_vectors, np.float32(-1e9)).max(axis=1))
        elif mode in ("mean_tokens", "mean_sqrt_len_tokens"):
            total = (token_vectors * mask).sum(axis=1)
            count = np.maximum(mask.sum(axis=1), np.float32(1e-9))
            parts.append(total / (count if mode == "mean_tokens" else np.sqrt(count)))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def normalized(vectors: Floats) -> Vectors:
    """Unit rows (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)
