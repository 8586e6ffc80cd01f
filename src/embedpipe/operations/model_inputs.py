"""From a request's texts to what the model is given: the prompt, the truncation side,
``truncate: false`` and long texts cut into windows; then the token counts.

Every embedding route runs the same steps, so every one of them treats these options alike::

    inputs = await model_inputs(service, model, texts, options, limits)   # 400s come from here
    charge(inputs.total_tokens)
    result = inputs.combine(await service.embed(model, inputs.texts, inputs.tokens,
                                                form=inputs.form))

A prompt the model pools over is part of the text (``"query: " + text``), which then is an
ordinary text for the cache, the counts and the clip: the same tokens give the same vector.
A prompt the model leaves out of pooling travels beside the text (``TextForm.prompt``), with
its own cache keys. ``long_text: "mean"`` cuts a text longer than the window into windows,
each an ordinary text (cached on its own); the input's vector is their mean weighted by their
tokens, L2-normalised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from embedpipe.embedders.base import TextForm
from embedpipe.embedders.tokens import LongText, TextTokenizer, Truncation
from embedpipe.errors import InvalidInput
from embedpipe.service import EmbeddingService, EmbedResult, Source
from embedpipe.settings import LimitsSettings

T = TypeVar("T")

# Texts longer than this together are tokenized on a thread, off the event loop.
_INLINE_CHARS = 4096


@dataclass(frozen=True, slots=True)
class InputOptions:
    """What a request says about how its texts meet the model."""

    prompt: str = ""
    truncate: bool = True
    truncation: Truncation = "right"
    long_text: LongText = "truncate"


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """``texts``: what the model is given (a long input's windows one after another), with
    ``tokens`` each, all in ``form``; ``spans``: how many of them make each input."""

    texts: list[str]
    tokens: list[int]
    form: TextForm
    spans: list[int]

    @property
    def total_tokens(self) -> int:
        """What ``usage`` reports and the token budget is charged: every token of every
        window, prompts and special tokens included."""
        return sum(self.tokens)

    def combine(self, result: EmbedResult) -> EmbedResult:
        """One vector per input: a window's vector as it is, several windows' mean weighted
        by their tokens, L2-normalised."""
        if len(self.spans) == len(self.texts):
            return result
        vectors = np.empty((len(self.spans), result.vectors.shape[1]), dtype=np.float32)
        sources: list[Source] = []
        start = 0
        for index, span in enumerate(self.spans):
            rows = slice(start, start + span)
            weights = np.asarray(self.tokens[rows], dtype=np.float64)
            mean = (result.vectors[rows].astype(np.float64) * weights[:, None]).sum(axis=0)
            vectors[index] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            window_sources = set(result.sources[rows])
            sources.append(window_sources.pop() if len(window_sources) == 1 else "computed")
            start += span
        return EmbedResult(result.model, vectors, sources, result.tokens)


async def model_inputs(
    service: EmbeddingService,
    model: str,
    texts: Sequence[str],
    options: InputOptions,
    limits: LimitsSettings,
    *,
    param: str = "input",
) -> ModelInputs:
    """The model's inputs for ``texts`` (already checked for size and emptiness); InvalidInput
    on ``param`` for a text over the window with ``truncate: false``, or over
    ``max_input_tokens_long`` with ``long_text: "mean"``."""
    embedder = service.models.get(model)
    tokenizer = embedder.tokenizer
    truncation = options.truncation if tokenizer is not None else "right"
    spans = [1] * len(texts)
    if options.long_text == "mean":
        if tokenizer is None:
            raise InvalidInput(
                f"'long_text': \"mean\" needs a model this server runs itself; '{model}' is "
                "served by an upstream API.",
                param="long_text",
            )
        texts, spans = await _off_loop(
            texts, _windows, tokenizer, texts, options.prompt, limits.max_input_tokens_long, param
        )
    prompt = options.prompt
    if prompt and embedder.prompts.in_pooling:
        texts, prompt = [prompt + text for text in texts], ""
    form = TextForm(prompt, truncation)
    clipped = await service.clip(model, texts, truncation)
    if not options.truncate and tokenizer is not None and options.long_text == "truncate":
        await _off_loop(texts, refuse_over_window, tokenizer, texts, clipped, param, form.prompt)
    tokens = await service.count_tokens(model, clipped, form)
    return ModelInputs(clipped, tokens, form, spans)


async def _off_loop(texts: Sequence[str], work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, on a thread when ``texts`` are long."""
    if sum(map(len, texts)) <= _INLINE_CHARS:
        return work(*args)
    return await asyncio.to_thread(work, *args)


def _windows(
    tokenizer: TextTokenizer, texts: Sequence[str], prompt: str, max_tokens: int, param: str
) -> tuple[list[str], list[int]]:
    """Every input as its windows (an input within the window: itself), and how many each."""
    counts = tokenizer.count([prompt + text for text in texts])
    windows: list[str] = []
    spans: list[int] = []
    for index, (text, count) in enumerate(zip(texts, counts, strict=True)):
        if count > max_tokens:
            where = param if len(texts) == 1 else f"{param}[{index}]"
            raise InvalidInput(
                f"'{where}' has {count} tokens; with long_text \"mean\" an input may hold at "
                f"most {max_tokens}.",
                param=param,
                code="context_length_exceeded",
            )
        pieces = [text] if count <= tokenizer.max_tokens else tokenizer.windows(text, prompt)
        windows += pieces
        spans.append(len(pieces))
    return windows, spans


def refuse_over_window(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    clipped: Sequence[str],
    param: str,
    prompt: str = "",
) -> None:
    """InvalidInput for the first text the model would cut. A clipped text was over the
    window; one that was not is short enough to count whole. The one refused is counted whole
    for its message."""
    pairs = list(zip(texts, clipped, strict=True))
    counts = iter(tokenizer.count([prompt + text for text, cut in pairs if cut == text]))
    for index, (text, cut) in enumerate(pairs):
        count = next(counts) if cut == text else tokenizer.count([prompt + text])[0]
        if count > tokenizer.max_tokens:
            where = param if len(texts) == 1 else f"{param}[{index}]"
            raise InvalidInput(
                f"'{where}' has {count} tokens, more than the {tokenizer.max_tokens} of the "
                "model's window, and 'truncate' is false.",
                param=param,
                code="context_length_exceeded",
            )
