"""One ONNX export run as the model directory says: its tokenizer, the exported transformer,
then pooling and normalisation in numpy. Needs onnxruntime and tokenizers only, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.embedders.base import Vectors
from embedpipe.embedders.model_files import ModelFiles
from embedpipe.embedders.pooling import normalized, pool
from embedpipe.embedders.tokens import Truncation

_FEATURES = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class OnnxRunner:
    """Texts → L2-normalised vectors through ``model_path``, one call at a time.

    ``threads``: intra-op threads of one inference; ``spin``: let idle pool threads
    busy-wait for work (ONNX Runtime's own default, off here)."""

    def __init__(
        self,
        model_path: Path,
        files: ModelFiles,
        inputs: Sequence[str],
        *,
        threads: int = 1,
        spin: bool = False,
    ) -> None:
        import onnxruntime

        self._files = files
        self._tokenizer = files.tokenizer()
        # truncation_direction "left": a copy cut at the text's start (settings are per object,
        # and this one is only used on the model's thread), made at the first such request:
        # each copy costs ~8 MiB resident.
        self._left_tokenizer: Any = None
        self._inputs = list(inputs)
        self._session = onnxruntime.InferenceSession(
            str(model_path), session_options(threads, spin), providers=["CPUExecutionProvider"]
        )

    @property
    def tokenizer(self) -> Any:
        """The tokenizer with the window's truncation (a ``tokenizers.Tokenizer``)."""
        return self._tokenizer

    def features(
        self, texts: Sequence[str], truncation: Truncation = "right"
    ) -> dict[str, np.ndarray]:
        tokenizer = self._tokenizer if truncation == "right" else self._cut_at_start()
        return features(tokenizer, self._files, self._inputs, texts)

    def _cut_at_start(self) -> Any:
        if self._left_tokenizer is None:
            left = self._files.tokenizer()
            left.enable_truncation(max_length=self._files.max_tokens, direction="left")
            self._left_tokenizer = left
        return self._left_tokenizer

    def token_vectors(self, features: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: features[name] for name in self._inputs}
        return np.asarray(self._session.run(None, feed)[0], dtype=np.float32)

    def embed(self, texts: Sequence[str], truncation: Truncation = "right") -> Vectors:
        features = self.features(texts, truncation)
        pooled = pool(self.token_vectors(features), features["attention_mask"], self._files.pooling)
        # Unit vectors even without a Normalize module: the torch backend gives them too.
        return normalized(pooled)


def features(
    tokenizer: Any, files: ModelFiles, inputs: Sequence[str], texts: Sequence[str]
) -> dict[str, np.ndarray]:
    """The model's inputs for ``texts`` (and always the attention mask, for pooling), from
    ``files.tokenizer()``: truncated at the window, padded to the longest."""
    batch = [text.lower() for text in texts] if files.do_lower_case else list(texts)
    encodings = tokenizer.encode_batch(batch)
    return {
        name: np.array([getattr(item, attribute) for item in encodings], dtype=np.int64)
        for name, attribute in _FEATURES.items()
        if name in inputs or name == "attention_mask"
    }


def session_options(threads: int, spin: bool) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # One inference at a time per model (the batcher): all cores inside one run, no
    # parallel branches between runs.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads busy-wait for work by default. On a few cores shared with the event
    # loop (tokenising, JSON) that steals the CPU the rest of the request path needs
    # (make bench-backends --threads measures both).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    # No arena: ONNX Runtime's keeps the memory of the largest call ever made (the warm-up's
    # full batch, ~37 MiB for all-MiniLM-L6-v2) for the life of the process; without it that
    # memory goes back after each call. Measured in the slim image: the same ms per call at
    # 1x12, 8x64 and 4x256 tokens, 35 MiB less resident at rest.
    options.enable_cpu_mem_arena = False
    return options
