"""A local model's tokenizer as the request path uses it beyond counting: full token counts
(``truncate: false``), the tokens themselves (``/tokenize``) and a long text's windows
(``long_text: "mean"``).

It reads a private copy of the model's Rust tokenizer with no padding and no truncation
(``model_files.plain_copy``), so its settings are never raced by the model thread's ``encode``
(see ``token_counter``); truncation is applied to each encoding, on the side asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

# Which end of a text past the model's window is cut (TEI's truncation_direction).
Truncation = Literal["right", "left"]
# A text past the window: "truncate" cuts it there (the default); "mean" embeds it as the
# token-weighted mean of its windows.
LongText = Literal["truncate", "mean"]


class TextTokenizer:
    """``tokenizer``: a ``tokenizers.Tokenizer`` without padding and truncation, only read
    here (``plain_copy``, which may be shared); ``max_tokens``: the model's window;
    ``window_tokens`` and ``overlap_tokens``: a long text's windows (special tokens and prompt
    included), 0 = the model's window."""

    def __init__(
        self, tokenizer: Any, max_tokens: int, *, window_tokens: int = 0, overlap_tokens: int = 0
    ) -> None:
        self._tokenizer = tokenizer
        self.max_tokens = max_tokens
        # [CLS] and [SEP] for BERT: what the window holds beyond the text's own tokens.
        self.special_tokens = len(self._tokenizer.encode("").ids)
        self.window_tokens = window_tokens or max_tokens
        self.overlap_tokens = overlap_tokens

    def count(self, texts: Sequence[str]) -> list[int]:
        """Every token of each text, special tokens included, whatever the window."""
        return [len(encoding.ids) for encoding in self._tokenizer.encode_batch(list(texts))]

    def content_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens (a prompt's share of a window)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode(
        self, text: str, *, add_special_tokens: bool = True, truncation: Truncation | None = None
    ) -> Any:
        """The ``tokenizers.Encoding`` of ``text``; with ``truncation``, cut to the window on
        that side as the model cuts it (special tokens kept)."""
        if truncation is None:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        room = self.max_tokens - (self.special_tokens if add_special_tokens else 0)
        encoding.truncate(max(room, 0), direction=truncation)
        if not add_special_tokens:
            return encoding
        return self._tokenizer.post_process(encoding, add_special_tokens=True)

    def windows(self, text: str, prompt: str = "") -> list[str]:
        """``text`` cut into windows that each fit the long-text window with ``prompt`` and
        the special tokens, consecutive ones sharing ``overlap_tokens``. Each window is a
        slice of ``text`` that starts and ends on word boundaries (a word longer than a window
        is cut inside), so it tokenizes to the same tokens on its own; a text that fits is
        one window, itself."""
        window_tokens = self.window_tokens - self.special_tokens - self.content_tokens(prompt)
        # The overlap stays under half a window, so that each window moves on.
        overlap_tokens = min(self.overlap_tokens, max(window_tokens // 2 - 1, 0))
        window_tokens = max(window_tokens, 1)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        words: list[int | None] = encoding.word_ids
        offsets: list[tuple[int, int]] = encoding.offsets
        total = len(words)
        if total <= window_tokens:
            return [text]

        def word_start(position: int, floor: int) -> int:
            """``position`` moved back to the first token of its word, but past ``floor``."""
            start = position
            while start > floor and words[start] is not None and words[start] == words[start - 1]:
                start -= 1
            return start if start > floor else position

        pieces: list[str] = []
        start = 0
        while True:
            end = start + window_tokens
            if end >= total:
                pieces.append(text[offsets[start][0] : offsets[total - 1][1]])
                return pieces
            end = word_start(end, start)
            pieces.append(text[offsets[start][0] : offsets[end - 1][1]])
            start = word_start(max(end - overlap_tokens, start + 1), start)
