"""Offline ONNX exports of a local sentence-transformers model, cached under the data dir.

    <data_dir>/onnx/<export id>-fp32/   model.onnx, the tokenizer, export.json
    <data_dir>/onnx/<export id>-int8/   the same, dynamically quantised from the fp32 export

The export id hashes the weights and every small file beside them (configs, pooling,
tokenizer), so another model never reuses an export. An export is built in a temporary directory
and renamed into place: readers see a complete export or none. A lock file makes a second
process (another ``--workers`` replica) wait for the first instead of exporting again.

Exporting runs torch and sentence-transformers; serving an export runs only ONNX Runtime and
the tokenizer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedpipe.errors import ModelLoadError

log = logging.getLogger("embedpipe.model")

Variant = Literal["fp32", "int8"]

MODEL_FILE = "model.onnx"
METADATA_FILE = "export.json"
# Bump when the graph or the quantisation recipe changes: old exports are then left unused.
EXPORT_FORMAT = 2
# Per-channel int8 weights (MatMul and the embedding tables), dynamic uint8 activations.
# Measured on the bench corpus: per-tensor weights gave cosine 0.957 mean / 0.905 min to
# fp32, per-channel 0.993 / 0.986.
INT8_RECIPE: dict[str, Any] = {"weight_type": "QInt8", "per_channel": True}
# fp32 must reproduce torch; anything less is a broken export, not a rounding difference.
FP32_MIN_COSINE = 0.9999

# Weights (hashed on their own) and other big files stay out of the export id.
_SMALL_FILE_BYTES = 4 * 1024 * 1024
_EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir", "root")
_PROBE_TEXTS = (
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


def ensure_export(model_dir: Path, weights_sha256: str, variant: Variant, root: Path) -> Path:
    """The directory of the ``variant`` export of the model in ``model_dir``, built on first use."""
    identity = export_id(model_dir, weights_sha256)
    fp32 = publish(root / f"{identity}-fp32", lambda out: _export_fp32(model_dir, out))
    if variant == "fp32":
        return fp32
    return publish(root / f"{identity}-int8", lambda out: _quantize_int8(fp32, out))


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
def _quiet_exporter() -> Iterator[None]:
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


def _write_metadata(out: Path, metadata: dict[str, Any]) -> None:
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True), "utf-8")


def _cosines(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    cosines = (got * want).sum(axis=1)
    return {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())}


def _run_export(export_dir: Path, texts: list[str]) -> np.ndarray:
    """Vectors of ``texts`` from an export directory, unnormalised: first all of them as one
    padded batch, then each alone (a trace that mishandles padding shows up here)."""
    import onnxruntime
    from transformers import AutoTokenizer

    metadata = read_metadata(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir), local_files_only=True)
    session = onnxruntime.InferenceSession(
        str(export_dir / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    outputs = []
    for batch in [texts, *([text] for text in texts)]:
        features = tokenizer(
            batch,
            padding=True,
            truncation=True,
            max_length=metadata["max_tokens"],
            return_tensors="np",
        )
        outputs.append(session.run(None, {name: features[name] for name in metadata["inputs"]})[0])
    return np.concatenate(outputs)


def _export_fp32(model_dir: Path, out: Path) -> None:
    """Trace the whole sentence-transformers pipeline (transformer, pooling, normalisation)
    into one graph with a dynamic batch and sequence length, and check it against torch.

    TorchScript tracing of eager attention, not the dynamo exporter or SDPA: ONNX Runtime
    fuses that graph's attention and layer norms, and it ran 1.25-1.4x faster here than the
    dynamo export (make bench-backends). The sample batch is padded, so the traced graph
    applies the attention mask; the probes check padded and unpadded batches alike."""
    import torch
    from sentence_transformers import SentenceTransformer

    log.info("exporting %s to ONNX in %s (once; later starts reuse it)", model_dir, out.parent)
    model = SentenceTransformer(
        str(model_dir),
        device="cpu",
        local_files_only=True,
        model_kwargs={"attn_implementation": "eager"},
    ).eval()
    tokenizer = model.tokenizer
    max_tokens = model.max_seq_length
    dimensions = model.get_embedding_dimension()
    if not max_tokens or not dimensions:
        raise ModelLoadError(f"{model_dir} declares no window or no embedding dimension")
    inputs = [
        name
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in tokenizer.model_input_names
    ]
    sample = tokenizer(
        ["an example sentence", "a second, somewhat longer example sentence"],
        padding=True,
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )
    with _quiet_exporter():
        torch.onnx.export(
            _pipeline(model),
            tuple(sample[name] for name in inputs),
            str(out / MODEL_FILE),
            input_names=inputs,
            output_names=["sentence_embedding"],
            dynamic_axes={
                **{name: {0: "batch", 1: "sequence"} for name in inputs},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    tokenizer.save_pretrained(str(out))
    metadata: dict[str, Any] = {
        "variant": "fp32",
        "format": EXPORT_FORMAT,
        "source": str(model_dir),
        "inputs": inputs,
        "max_tokens": max_tokens,
        "dimensions": dimensions,
        "torch": torch.__version__,
    }
    _write_metadata(out, metadata)
    texts = list(_PROBE_TEXTS)
    want = model.encode(
        texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    cosines = _cosines(_run_export(out, texts), np.concatenate([want, want]))
    if cosines["min_cosine"] < FP32_MIN_COSINE:
        raise ModelLoadError(
            f"the ONNX export of {model_dir} does not reproduce the torch model "
            f"(cosine {cosines['min_cosine']:.6f} < {FP32_MIN_COSINE})"
        )
    _write_metadata(out, {**metadata, "fidelity": {"against": "torch", **cosines}})


def _quantize_int8(fp32: Path, out: Path) -> None:
    """Dynamic int8 quantisation of the fp32 export; its fidelity to fp32 on the probes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantising the ONNX export %s to int8", fp32)
    with _quiet_exporter():
        quantize_dynamic(
            fp32 / MODEL_FILE,
            out / MODEL_FILE,
            weight_type=QuantType[INT8_RECIPE["weight_type"]],
            per_channel=INT8_RECIPE["per_channel"],
        )
    for item in fp32.iterdir():
        if item.name not in (MODEL_FILE, METADATA_FILE) and item.is_file():
            shutil.copy2(item, out / item.name)
    metadata = {**read_metadata(fp32), "variant": "int8", "int8_recipe": INT8_RECIPE}
    metadata.pop("fidelity", None)
    _write_metadata(out, metadata)
    texts = list(_PROBE_TEXTS)
    fidelity = {
        "against": "onnx-fp32",
        **_cosines(_run_export(out, texts), _run_export(fp32, texts)),
    }
    _write_metadata(out, {**metadata, "fidelity": fidelity})


def _pipeline(model: Any) -> Any:
    """The sentence-transformers modules as one torch module over plain tensors (defined
    here because torch is imported only to export)."""
    import torch

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            return self.model(features)["sentence_embedding"]

    return Pipeline().eval()
