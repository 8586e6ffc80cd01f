"""Cutting a text where the model's window ends, before anything tokenizes all of it.

A model sees at most its window of tokens; the rest of a long text is thrown away after
tokenizing. Tokenizing costs time and memory per *character* (the Rust tokenizer keeps an
alignment per character: about 80 bytes each), so a 1 MB text cost a second and 80 MB to give
256 tokens. :class:`WindowClipper` cuts first, keeping exactly the tokens the model would keep:

- It tokenizes a prefix no longer than a window's worth of tokens can be: ``window x`` the
  longest span one token covers (the longest vocabulary entry, or a whole word the tokenizer
  maps to ``[UNK]``: 100 characters for BERT's WordPiece), plus one separator each.
- When that prefix holds more tokens than the window, and the window's last token belongs to
  a word that ends before the prefix does, the text is cut after that word: every token up to
  it depends on those characters only (tokenizers normalise per character and split into
  words before the word-piece model runs), so the cut text gives the same first window of
  tokens, and the model truncates both at the same place.
- Otherwise (the prefix was mostly whitespace or characters the normaliser drops) the prefix
  grows fourfold and it tries again; at worst the whole text is tokenized, as before.

``truncation_direction: "left"`` keeps the *end* of a text instead, and :meth:`clip_left` is
the mirror image: it tokenizes a suffix of the same bound and cuts the text before the first
word of the last window's worth of tokens, when that word starts after the suffix does. The
model, truncating on the left, then keeps exactly the tokens it would keep of the whole text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# The longest word WordPiece spells out; a longer one becomes one [UNK] (BERT's default).
_DEFAULT_MAX_WORD_CHARS = 100


class WindowClipper:
    """``clip(text)``: the text cut after the last word of the model's window (or as it is)."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        """``tokenizer``: a ``tokenizers.Tokenizer`` without padding and truncation, only read
        here (``model_files.plain_copy``, which may be shared)."""
        self._tokenizer: Tokenizer = tokenizer
        specials = len(self._tokenizer.encode("").ids)
        self._content_tokens = max(1, max_tokens - specials)
        longest = max((len(t.removeprefix("##")) for t in self._tokenizer.get_vocab()), default=1)
        word = getattr(self._tokenizer.model, "max_input_chars_per_word", _DEFAULT_MAX_WORD_CHARS)
        self.bound = max_tokens * (max(longest, int(word)) + 1)

    def clip(self, text: str) -> str:
        bound = self.bound
        while len(text) > bound:
            end = self._window_end(text[:bound])
            if end is not None:
                return text[:end]
            bound *= 4
        return text

    def clip_left(self, text: str) -> str:
        bound = self.bound
        while len(text) > bound:
            start = self._window_start(text[-bound:])
            if start is not None:
                return text[len(text) - bound + start :]
            bound *= 4
        return text

    def _window_start(self, suffix: str) -> int | None:
        """Where the first word with a token in the last window starts, if it starts after
        the suffix does (so the suffix's own start, perhaps mid-word, cannot matter); else
        None."""
        encoding = self._tokenizer.encode(suffix, add_special_tokens=False)
        words = encoding.word_ids
        if len(words) <= self._content_tokens:
            return None
        kept = words[len(words) - self._content_tokens]
        if kept is None or kept == words[0]:
            return None
        return min(
            start for (start, _), word in zip(encoding.offsets, words, strict=True) if word == kept
        )

    def first_tokens(self, text: str, tokens: int) -> str:
        """``text`` cut after its first ``tokens`` tokens (special tokens not counted)."""
        text = self.clip(text)  # at most a window's worth to tokenize
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= tokens:
            return text
        return text[: encoding.offsets[tokens - 1][1]]

    def _window_end(self, prefix: str) -> int | None:
        """Where the last word with a token in the window ends, if it ends before the prefix
        does (so the prefix's own end, perhaps mid-word, cannot matter); else None."""
        encoding = self._tokenizer.encode(prefix, add_special_tokens=False)
        words = encoding.word_ids
        if len(words) <= self._content_tokens:
            return None
        kept = words[self._content_tokens - 1]
        if kept is None or kept == words[-1]:
            return None
        return max(
            end for (_, end), word in zip(encoding.offsets, words, strict=True) if word == kept
        )
