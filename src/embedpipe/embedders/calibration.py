"""Texts that ship with every CPython (the Python documentation ``help()`` reads,
``pydoc_data.topics``), for the int8 export: one half calibrates its activation ranges, the
other half is its fidelity gate. Disjoint, in a fixed order, so every machine gets the same
export and the gate never grades the texts it was calibrated on."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator, Sequence

import numpy as np

from embedpipe.embedders.model_files import ModelFiles
from embedpipe.embedders.onnx_runner import features

_MIN_CHARS = 40
_MAX_CHARS = 1_500


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    found: dict[str, None] = {}
    for _, page in sorted(topics.items()):
        for paragraph in re.split(r"\n\s*\n", page):
            text = " ".join(paragraph.split())
            if _MIN_CHARS <= len(text) <= _MAX_CHARS:
                found[text] = None
    return tuple(found)


def calibration_texts(count: int = 256) -> list[str]:
    """Every other paragraph, from the first: the activation ranges of a static int8 export."""
    return list(_paragraphs()[0::2][:count])


def gate_texts(count: int = 256) -> list[str]:
    """Every other paragraph, from the second: never calibrated on."""
    return list(_paragraphs()[1::2][:count])


def calibration_digest() -> str:
    """Identity of the calibration texts (they come with the Python that makes the export)."""
    return hashlib.sha256("\n".join(calibration_texts()).encode()).hexdigest()[:16]


class CalibrationReader:
    """The calibration texts as model inputs, 16 at a time (the interface of ONNX Runtime's
    ``CalibrationDataReader``: ``get_next`` until None)."""

    def __init__(self, files: ModelFiles, inputs: Sequence[str]) -> None:
        tokenizer = files.tokenizer()
        texts = calibration_texts()
        self._feeds: Iterator[dict[str, np.ndarray]] = (
            {
                name: value
                for name, value in features(tokenizer, files, inputs, texts[at : at + 16]).items()
                if name in inputs
            }
            for at in range(0, len(texts), 16)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)
