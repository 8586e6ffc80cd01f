"""Local models on ONNX Runtime: an offline export of the same weights (``onnx_export``),
fp32 or quantised to int8 (``onnx_int8``). With the export present, nothing here imports
torch, transformers or sentence-transformers: the tokenizer, window and pooling come from the
model directory's files (``model_files``), the rest from onnxruntime and ``tokenizers``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedpipe.embedders.base import PLAIN, ModelInfo, TextForm, Vectors, fingerprint_of
from embedpipe.embedders.local_text import LocalText
from embedpipe.embedders.model_files import read_json, read_model_files, weights_identity
from embedpipe.embedders.onnx_export import (
    MODEL_FILE,
    Variant,
    export_fp32,
    export_id,
    publish,
    read_metadata,
)
from embedpipe.embedders.onnx_int8 import quantize_int8
from embedpipe.embedders.onnx_runner import OnnxRunner
from embedpipe.embedders.prompts import ModelPrompts, merged_prompts
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
        weights_sha256 = weights_identity(name, model_dir, expected_sha256)
        files = read_model_files(model_dir)
        export_dir = ensure_export(model_dir, weights_sha256, variant, export_root)
        metadata = read_metadata(export_dir)
        self._runner = OnnxRunner(
            export_dir / MODEL_FILE, files, metadata["inputs"], threads=threads, spin=spin
        )
        backend = "onnx" if variant == "fp32" else f"onnx-{variant}"
        self._info = ModelInfo(
            name=name,
            backend=backend,
            dimensions=int(metadata["dimensions"]),
            max_tokens=files.max_tokens,
            source=str(model_dir),
            weights_sha256=weights_sha256,
        )
        # Counts use a private copy of the tokenizer: they never race embed().
        prompts = _prompts_of(model_dir, options)
        self._init_text(self._runner.tokenizer, files.max_tokens, options, prompts)
        # Never torch's fingerprint: fp32 vectors differ from torch's by ~3e-7 and int8 by
        # up to a few percent, so each backend and variant caches under its own key.
        identity = {
            "weights": weights_sha256,
            "backend": backend,
            "export": export_dir.name,
            "int8_recipe": metadata.get("int8_recipe"),
            **files.identity(),
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
        return self._runner.embed(texts, form.truncation)


def ensure_export(model_dir: Path, weights_sha256: str, variant: Variant, root: Path) -> Path:
    """The directory of the ``variant`` export of the model in ``model_dir``, built on first use."""
    identity = export_id(model_dir, weights_sha256)
    fp32 = publish(root / f"{identity}-fp32", lambda out: export_fp32(model_dir, out))
    if variant == "fp32":
        return fp32
    return publish(root / f"{identity}-int8", lambda out: quantize_int8(model_dir, fp32, out))


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
