"""Offline ONNX exports of a local sentence-transformers model, cached under the data dir.

    <data_dir>/onnx/<export id>-fp32/   model.onnx (the transformer: token vectors), export.json
    <data_dir>/onnx/<export id>-int8/   the same, quantised from the fp32 export (``onnx_int8``)

The export id hashes the weights and every small file beside them (configs, pooling,
tokenizer), so another model never reuses an export. An export is built in a temporary directory
and renamed into place: readers see a complete export or none. A lock file makes a second
process (another ``--workers`` replica) wait for the first instead of exporting again.

Exporting runs torch and sentence-transformers, once, ahead of time (``embedpipe models``, in
the image build); serving an export runs only ONNX Runtime and ``tokenizers``, with the
tokenizer, window and pooling read from the model directory's own files (``model_files``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedpipe.embedders.model_files import ModelFiles, read_model_files
from embedpipe.embedders.onnx_runner import OnnxRunner
from embedpipe.errors import ModelLoadError

log = logging.getLogger("embedpipe.model")

Variant = Literal["fp32", "int8"]

MODEL_FILE = "model.onnx"
METADATA_FILE = "export.json"
# Bump when the graph or the quantisation recipe changes: old exports are then left unused.
# 3: the graph ends at the transformer's token vectors; pooling runs in numpy (pooling.py).
# 4: the int8 recipe's weights are uint8 (onnx_int8.INT8_RECIPE).
EXPORT_FORMAT = 4
# fp32 must reproduce torch; anything less is a broken export, not a rounding difference.
FP32_MIN_COSINE = 0.9999

# Weights (hashed on their own) and other big files stay out of the export id.
_SMALL_FILE_BYTES = 4 * 1024 * 1024
_EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir", "root")
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings turn text into vectors for search and retrieval.",
    "short",
    "",
    "Ein deutscher Satz mit Umlauten: äöü ß. 日本語の文もあります。",
    "A much longer passage that runs past the model's window of tokens. " * 40,
)


def export_id(model_dir: Path, weights_sha256: str) -> str:
    """Identity of an export: the weights, every small file beside them (configs, pooling,
    tokenizer: the export carries a copy of the tokenizer) and the export format."""
    files = {
        str(path.relative_to(model_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(model_dir.rglob("*"))
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(model_dir).parts)
        and path.stat().st_size <= _SMALL_FILE_BYTES
    }
    blob = json.dumps(
        {"weights": weights_sha256, "files": files, "format": EXPORT_FORMAT}, sort_keys=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def publish(target: Path, build: Callable[[Path], None]) -> Path:
    """``target`` as ``build`` fills it, built at most once however many processes ask."""
    if (target / METADATA_FILE).is_file():
        log.info("reusing the ONNX export at %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / METADATA_FILE).is_file():  # another process built it while we waited
            log.info("reusing the ONNX export at %s", target)
            return target
        # Leftovers of a builder that died: nobody else builds this target while we hold the lock.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # a directory without metadata is not an export
            shutil.rmtree(target)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(scratch)
            if not (scratch / METADATA_FILE).is_file():
                raise ModelLoadError(f"the build of {target} wrote no {METADATA_FILE}")
            scratch.chmod(0o755)  # mkdtemp's 0700 would hide it from other users of the volume
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporters' own notes (deprecations, hundreds of INFO lines per graph pass, missing
    torchvision ops): nothing an operator can act on, so kept out of the service's logs."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def read_metadata(export_dir: Path) -> dict[str, Any]:
    metadata: dict[str, Any] = json.loads((export_dir / METADATA_FILE).read_text("utf-8"))
    return metadata


def write_metadata(out: Path, metadata: dict[str, Any]) -> None:
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True), "utf-8")


def cosines(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    similarity = (got * want).sum(axis=1)
    return {"min_cosine": float(similarity.min()), "mean_cosine": float(similarity.mean())}


def probe_vectors(export_dir: Path, files: ModelFiles, texts: Sequence[str]) -> np.ndarray:
    """Vectors of ``texts`` from an export directory, as the service computes them: first all
    of them as one padded batch, then each alone (a trace that mishandles padding shows up)."""
    runner = OnnxRunner(export_dir / MODEL_FILE, files, read_metadata(export_dir)["inputs"])
    return np.concatenate([runner.embed(batch) for batch in [texts, *([t] for t in texts)]])


def export_fp32(model_dir: Path, out: Path) -> None:
    """Trace the model's transformer into one graph with a dynamic batch and sequence length,
    ending at its token vectors, and check the whole pipeline (with pooling and normalisation
    from the model's files, as served) against sentence-transformers.

    TorchScript tracing of eager attention, not the dynamo exporter or SDPA: ONNX Runtime
    fuses that graph's attention and layer norms, and it ran 1.25-1.4x faster here than the
    dynamo export (make bench-backends). The sample batch is padded, so the traced graph
    applies the attention mask; the probes check padded and unpadded batches alike."""
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as missing:
        raise ModelLoadError(
            f"there is no ONNX export of {model_dir} under {out.parent}, and no {missing.name} "
            "here to make one: make it ahead of time where torch is installed, with the same "
            "settings, by `EMBEDPIPE_BACKEND=onnx embedpipe models` (as the image build does)"
        ) from None

    files = read_model_files(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub must never be reached
    log.info("exporting %s to ONNX in %s (once; later starts reuse it)", model_dir, out.parent)
    model = SentenceTransformer(
        str(model_dir),
        device="cpu",
        local_files_only=True,
        model_kwargs={"attn_implementation": "eager"},
    ).eval()
    tokenizer = model.tokenizer
    dimensions = model.get_embedding_dimension()
    if model.max_seq_length != files.max_tokens or not dimensions:
        raise ModelLoadError(
            f"{model_dir}: sentence-transformers reads a window of {model.max_seq_length} "
            f"tokens, its files {files.max_tokens}"
        )
    inputs = [
        name
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in tokenizer.model_input_names
    ]
    sample = tokenizer(
        ["an example sentence", "a second, somewhat longer example sentence"],
        padding=True,
        truncation=True,
        max_length=files.max_tokens,
        return_tensors="pt",
    )
    with quiet_exporter():
        torch.onnx.export(
            _token_vectors_module(model[0]),
            tuple(sample[name] for name in inputs),
            str(out / MODEL_FILE),
            input_names=inputs,
            output_names=["token_embeddings"],
            dynamic_axes={
                **{name: {0: "batch", 1: "sequence"} for name in inputs},
                "token_embeddings": {0: "batch", 1: "sequence"},
            },
            opset_version=17,
            dynamo=False,
        )
    metadata: dict[str, Any] = {
        "variant": "fp32",
        "format": EXPORT_FORMAT,
        "source": str(model_dir),
        "inputs": inputs,
        "max_tokens": files.max_tokens,
        "dimensions": dimensions,
        "torch": torch.__version__,
    }
    write_metadata(out, metadata)
    texts = list(PROBE_TEXTS)
    want = model.encode(
        texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    fidelity = cosines(probe_vectors(out, files, texts), np.concatenate([want, want]))
    if fidelity["min_cosine"] < FP32_MIN_COSINE:
        raise ModelLoadError(
            f"the ONNX export of {model_dir} does not reproduce the torch model "
            f"(cosine {fidelity['min_cosine']:.6f} < {FP32_MIN_COSINE})"
        )
    write_metadata(out, {**metadata, "fidelity": {"against": "torch", **fidelity}})


def _token_vectors_module(transformer: Any) -> Any:
    """sentence-transformers' Transformer module as a torch module over plain tensors,
    giving its token vectors (defined here because torch is imported only to export)."""
    import torch

    class TokenVectors(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            return self.transformer(features)["token_embeddings"]

    return TokenVectors().eval()
