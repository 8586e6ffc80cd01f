"""Local models on ONNX Runtime: an offline export of the same weights (``onnx_export``),
fp32 or dynamically quantised to int8."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.embedders.base import PLAIN, ModelInfo, TextForm, Vectors, fingerprint_of
from embedpipe.embedders.local_text import LocalText
from embedpipe.embedders.onnx_export import (
    MODEL_FILE,
    Variant,
    ensure_export,
    read_metadata,
)
from embedpipe.embedders.prompts import ModelPrompts, merged_prompts
from embedpipe.embedders.sentence_transformers import checked_weights, read_json
from embedpipe.errors import InvalidInput, ModelLoadError
from embedpipe.settings import ModelOptions

log = logging.getLogger("embedpipe.model")


class OnnxEmbedder(LocalText):
    """One ONNX Runtime session per served model, called from the model's own thread.

    ``threads``: intra-op threads of one inference; ``spin``: let idle pool threads
    busy-wait for work (ONNX Runtime's own default, off here)."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        *,
        export_root: Path,
        variant: Variant = "fp32",
        threads: int = 1,
        spin: bool = False,
        expected_sha256: str | None = None,
        options: ModelOptions | None = None,
    ) -> None:
        options = options or ModelOptions()
        weights_sha256 = checked_weights(name, model_dir, expected_sha256)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        export_dir = ensure_export(model_dir, weights_sha256, variant, export_root)
        metadata = read_metadata(export_dir)

        import onnxruntime
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(export_dir), local_files_only=True)
        self._inputs: list[str] = metadata["inputs"]
        self._session = onnxruntime.InferenceSession(
            str(export_dir / MODEL_FILE),
            _session_options(threads, spin),
            providers=["CPUExecutionProvider"],
        )
        backend = "onnx" if variant == "fp32" else f"onnx-{variant}"
        self._info = ModelInfo(
            name=name,
            backend=backend,
            dimensions=int(metadata["dimensions"]),
            max_tokens=int(metadata["max_tokens"]),
            source=str(model_dir),
            weights_sha256=weights_sha256,
        )
        # Counts never use self._tokenizer: they must not race embed()'s padding settings.
        prompts = _prompts_of(model_dir, options)
        self._init_text(self._tokenizer, self._info.max_tokens, options, prompts)
        # Never torch's fingerprint: fp32 vectors differ from torch's by ~3e-7 and int8 by
        # up to a few percent, so each backend and variant caches under its own key.
        identity = {
            "weights": weights_sha256,
            "backend": backend,
            "export": export_dir.name,
            "int8_recipe": metadata.get("int8_recipe"),
            "normalize": True,
            "max_tokens": self._info.max_tokens,
            "prompt": "",
        }
        self._fingerprint = fingerprint_of(identity)
        fidelity = metadata.get("fidelity", {})
        log.info(
            "loaded model %s on ONNX Runtime (%s, %d threads) from %s; probe cosine to %s min %.6f",
            name,
            variant,
            threads,
            export_dir,
            fidelity.get("against", "?"),
            fidelity.get("min_cosine", float("nan")),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def embed(self, texts: Sequence[str], form: TextForm = PLAIN) -> Vectors:
        if not texts:
            return np.empty((0, self._info.dimensions), dtype=np.float32)
        if form.prompt:  # _prompts_of keeps every prompt in the text for this backend
            raise ValueError("the ONNX backend embeds prompts as part of the text")
        # As sentence-transformers does: truncate at the window, pad to the batch's longest.
        self._tokenizer.truncation_side = form.truncation
        features = self._tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self._info.max_tokens,
            return_tensors="np",
        )
        self._tokenizer.truncation_side = "right"
        feed = {name: features[name].astype(np.int64, copy=False) for name in self._inputs}
        vectors = np.asarray(self._session.run(None, feed)[0], dtype=np.float32)
        # The graph normalises already (the model's Normalize module); a model directory
        # without one must still give unit vectors, as the torch backend does.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def _prompts_of(model_dir: Path, options: ModelOptions) -> ModelPrompts:
    """The prompts of the model's sentence-transformers config, under ``options``. The
    exported graph pools over every token, so a model that leaves its prompt out of pooling
    cannot be served here with prompts."""
    config = read_json(model_dir / "config_sentence_transformers.json") or {}
    pooling = read_json(model_dir / "1_Pooling" / "config.json") or {}
    if not pooling.get("include_prompt", True):
        raise ModelLoadError(
            f"{model_dir} excludes its prompt from pooling, which the ONNX backend cannot do; "
            "serve it on the torch backend"
        )
    try:
        return merged_prompts(
            # As sentence-transformers loads them: "query" and "document" always exist.
            {"query": None, "document": None, **(config.get("prompts") or {})},
            config.get("default_prompt_name"),
            options.prompts,
            options.default_prompt_name,
            in_pooling=True,
        )
    except InvalidInput as exc:
        raise ModelLoadError(f"{model_dir}: {exc.message}") from None


def _session_options(threads: int, spin: bool) -> Any:
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
    return options
