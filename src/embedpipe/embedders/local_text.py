"""The text side of a local model, the same for every local backend: token counts, the cut
at the window (either end), the full tokenizer and the prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from embedpipe.embedders.base import PLAIN, TextForm
from embedpipe.embedders.model_files import plain_copy
from embedpipe.embedders.prompts import ModelPrompts
from embedpipe.embedders.tokens import TextTokenizer, Truncation
from embedpipe.embedders.window import WindowClipper
from embedpipe.errors import ModelLoadError
from embedpipe.settings import ModelOptions


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


class LocalText:
    """Mixed into a local backend: ``_init_text`` once, from its Rust ``tokenizers.Tokenizer``;
    then it serves ``prompts``, ``tokenizer``, ``count_tokens`` and ``clip`` of the
    ``ServedModel`` protocol. Nothing here touches the model's own tokenizer object (see
    ``token_counter``)."""

    def _init_text(
        self, tokenizer: Any, max_tokens: int, options: ModelOptions, prompts: ModelPrompts
    ) -> None:
        # One private copy for counting, clipping and windows (~8 MiB each copy).
        plain = plain_copy(tokenizer)
        self._clipper = WindowClipper(plain, max_tokens)
        self._tokens = long_text_tokenizer(plain, max_tokens, options)
        self._prompts = prompts

    @property
    def prompts(self) -> ModelPrompts:
        return self._prompts

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokens

    def count_tokens(self, texts: Sequence[str], form: TextForm = PLAIN) -> list[int]:
        # Counted as the model sees the text: cut at its window (special tokens kept, so a
        # single text's count is its full count, or the window).
        counts = self._tokens.count([form.prompt + text for text in texts])
        return [min(count, self._tokens.max_tokens) for count in counts]

    def clip(self, texts: Sequence[str], truncation: Truncation = "right") -> list[str]:
        cut = self._clipper.clip if truncation == "right" else self._clipper.clip_left
        return [cut(text) for text in texts]
