"""The torch backend runs ``preprocess`` and the modules itself rather than through
``SentenceTransformer.encode`` (which walks every parameter and module on each call). The
vectors must be encode's, bit for bit, in every form a request can take: single texts,
batches of mixed and equal lengths, both truncation sides past the window, a prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.corpus import load_corpus
from embedpipe.embedders.base import TextForm
from embedpipe.embedders.sentence_transformers import SentenceTransformerEmbedder

pytestmark = pytest.mark.model

LONG = " ".join(f"word{i}" for i in range(600))  # past the 256-token window


@pytest.fixture(scope="module")
def embedder(bundled_model_dir: Path) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder("all-MiniLM-L6-v2", bundled_model_dir)


def encoded(model: Any, texts: list[str], form: TextForm) -> np.ndarray:
    model.tokenizer.truncation_side = form.truncation
    try:
        vectors: np.ndarray = model.encode(
            texts, prompt=form.prompt, batch_size=len(texts), normalize_embeddings=True
        )
    finally:
        model.tokenizer.truncation_side = "right"
    return vectors


@pytest.mark.parametrize(
    "texts",
    [
        *[[text] for text in load_corpus(4)],
        load_corpus(9, 100),
        load_corpus(32, 200),
        # Equal lengths in characters: encode's order among ties decides row places.
        ["abcd efgh", "ijkl mnop", "qrst uvwx", "short", "a", "b", "the same"],
        [LONG, "a short one", LONG[::-1]],
    ],
    ids=lambda texts: f"{len(texts)}-texts",
)
@pytest.mark.parametrize(
    "form",
    [TextForm(), TextForm(truncation="left"), TextForm(prompt="query: ")],
    ids=["plain", "left", "prompt"],
)
def test_the_vectors_are_encodes_bit_for_bit(
    embedder: SentenceTransformerEmbedder, reference_model: Any, texts: list[str], form: TextForm
) -> None:
    got = embedder.embed(texts, form)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, encoded(reference_model, texts, form))


def test_left_truncation_is_undone_after_each_call(
    embedder: SentenceTransformerEmbedder, reference_model: Any
) -> None:
    embedder.embed([LONG], TextForm(truncation="left"))
    np.testing.assert_array_equal(
        embedder.embed([LONG]), encoded(reference_model, [LONG], TextForm())
    )


def test_no_texts_no_vectors(embedder: SentenceTransformerEmbedder) -> None:
    assert embedder.embed([]).shape == (0, 384)
