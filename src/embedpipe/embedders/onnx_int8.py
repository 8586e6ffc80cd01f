"""The int8 export: quantised from the fp32 export by a recipe, and refused below its
fidelity gate.

A recipe says which MatMuls become int8 and how their activations are scaled:

- ``dynamic``: ONNX Runtime's dynamic quantisation, one activation scale per tensor per call;
- ``static``: one activation scale per tensor, measured once on calibration texts (QDQ);
- ``blockwise``: int8 weights in blocks of ``block_size`` along the inner dimension, each with
  its own scale (ONNX Runtime's MatMulNBits); with ``accuracy_level`` 4 the activations are
  quantised to int8 per row and block too, so one outlier channel or token spoils one block,
  not the whole tensor.

``smooth`` (alpha > 0) first moves the activations' outlier channels into the weights, as
SmoothQuant does: each MatMul's input channel j is divided by s_j = max|x_j|^alpha /
max|W_j|^(1 - alpha) (a Mul on the MatMuls' own branch, ranges from the calibration texts) and
its weight row multiplied by s_j, so one per-tensor activation scale fits every channel. Some
MatMuls are sensitive (the FFN's output projection reads GELU's long-tailed activations) and
can stay fp32. ``benchmarks/int8.py`` measures each recipe's speed and fidelity
(docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedpipe.embedders.calibration import CalibrationReader, calibration_digest, gate_texts
from embedpipe.embedders.model_files import ModelFiles, read_model_files
from embedpipe.embedders.onnx_export import (
    METADATA_FILE,
    MODEL_FILE,
    PROBE_TEXTS,
    cosines,
    probe_vectors,
    quiet_exporter,
    read_metadata,
    write_metadata,
)
from embedpipe.embedders.onnx_runner import OnnxRunner
from embedpipe.embedders.onnx_smoothing import smooth
from embedpipe.errors import ModelLoadError

log = logging.getLogger("embedpipe.model")

NEIGHBOURS = 10


@dataclass(frozen=True, slots=True)
class Int8Recipe:
    """How an fp32 export becomes int8 (part of the export's record and cache fingerprint)."""

    name: str
    kind: Literal["dynamic", "static", "blockwise"] = "dynamic"
    per_channel: bool = True  # dynamic, static: one weight scale per output channel
    embeddings: bool = False  # dynamic, static: the embedding tables (Gather) too
    keep_fp32: tuple[str, ...] = ()  # MatMuls whose node name contains one of these
    block_size: int = 32  # blockwise: weights (and activations) per scale
    accuracy_level: int = 4  # blockwise: 4 = int8 activations and int8 products
    smooth: float = 0.0  # dynamic, static: SmoothQuant's alpha (0 = off)
    # dynamic, static: the weights' type. With int8 weights, AVX2 without VNNI multiplies
    # uint8 activations by int8 weights with vpmaddubsw, whose int16 sums saturate; uint8
    # weights take a kernel that widens first, exact on every x86 CPU.
    weights: Literal["int8", "uint8"] = "int8"

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "keep_fp32": list(self.keep_fp32)}


@dataclass(frozen=True, slots=True)
class Int8Gate:
    """The least fidelity to the fp32 export (= torch's vectors) an int8 export may have, on
    texts it was not calibrated on: each text's cosine, and its 10 nearest neighbours."""

    min_cosine: float = 0.995
    top10: float = 0.97


# The served recipe: the fastest measured above the gate on every CPU we met
# (docs/benchmarks.md#int8-recipes). Without smoothing, per-tensor activation scales lost
# neighbours (top-10 0.906; 0.934 with the FFN's output projection in fp32); blockwise int8 kept
# them (0.980) but ran barely faster than fp32 (1.05x) on AVX2. uint8 weights: the same recipe
# with int8 weights passed the gate on AVX-512 VNNI (0.978) and failed it on AVX2 alone (0.934,
# saturating int16 sums), and an export made on one CPU may be served on another.
INT8_RECIPE = Int8Recipe(
    name="smoothed-0.8-ffn-out-fp32-u8",
    smooth=0.8,
    keep_fp32=("/output/dense/",),
    weights="uint8",
)
INT8_GATE = Int8Gate()


def quantize_int8(
    model_dir: Path,
    fp32: Path,
    out: Path,
    recipe: Int8Recipe = INT8_RECIPE,
    gate: Int8Gate = INT8_GATE,
) -> None:
    """Quantise the fp32 export by ``recipe``; ModelLoadError, with the figures, when it
    falls below ``gate``."""
    files = read_model_files(model_dir)
    log.info("quantising the ONNX export %s to int8 (%s)", fp32, recipe.name)
    inputs: list[str] = read_metadata(fp32)["inputs"]
    quantize_model(fp32 / MODEL_FILE, out / MODEL_FILE, recipe, files, inputs)
    for item in fp32.iterdir():
        if item.name not in (MODEL_FILE, METADATA_FILE) and item.is_file():
            shutil.copy2(item, out / item.name)
    record = recipe.record()
    if recipe.smooth or recipe.kind == "static":
        # Another Python's documentation calibrates differently: its own cache entries.
        record["calibration"] = calibration_digest()
    metadata = {**read_metadata(fp32), "variant": "int8", "int8_recipe": record}
    metadata.pop("fidelity", None)
    write_metadata(out, metadata)
    fidelity = measure_fidelity(fp32, out, files)
    if fidelity["min_cosine"] < gate.min_cosine or fidelity["top10"] < gate.top10:
        raise ModelLoadError(
            f"the int8 export ({recipe.name}) is below its fidelity gate against fp32: "
            f"min cosine {fidelity['min_cosine']:.4f} (gate {gate.min_cosine}), top-10 "
            f"neighbours {fidelity['top10']:.3f} (gate {gate.top10}) on "
            f"{fidelity['texts']} texts; serve fp32 instead (EMBEDPIPE_ONNX_QUANTIZE=none)"
        )
    write_metadata(out, {**metadata, "fidelity": fidelity})


def quantize_model(
    source: Path, target: Path, recipe: Int8Recipe, files: ModelFiles, inputs: Sequence[str]
) -> None:
    """Write the int8 graph of the fp32 graph ``source`` to ``target``. A smoothed graph is
    an intermediate file beside ``target``, removed afterwards: the export is ``target``
    alone (the intermediate is the size of the fp32 graph)."""
    import onnx

    model = onnx.load(str(source))
    if not recipe.smooth or recipe.kind == "blockwise":
        _quantize_graph(model, source, target, recipe, files, inputs)
        return
    smooth(model, recipe.smooth, files, inputs)
    smoothed = target.with_name(f"{target.stem}.smoothed.onnx")
    try:
        onnx.save(model, str(smoothed))
        _quantize_graph(model, smoothed, target, recipe, files, inputs)
    finally:
        smoothed.unlink(missing_ok=True)


def _quantize_graph(
    model: Any,
    source: Path,
    target: Path,
    recipe: Int8Recipe,
    files: ModelFiles,
    inputs: Sequence[str],
) -> None:
    """``quantize_model`` once the graph is ready: ``model`` is loaded from ``source``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    kept = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and any(part in node.name for part in recipe.keep_fp32)
    ]
    if recipe.kind == "blockwise":
        _quantize_blockwise(model, recipe, set(kept))
        onnx.save(model, str(target))
        return
    op_types = ["MatMul", *(["Gather"] if recipe.embeddings else [])]
    weight_type = QuantType.QUInt8 if recipe.weights == "uint8" else QuantType.QInt8
    with quiet_exporter():
        if recipe.kind == "dynamic":
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=op_types,
                per_channel=recipe.per_channel,
                weight_type=weight_type,
                nodes_to_exclude=kept,
            )
            return
        quantize_static(
            source,
            target,
            CalibrationReader(files, inputs),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=recipe.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=weight_type,
            nodes_to_exclude=kept,
            calibrate_method=CalibrationMethod.MinMax,
            # Only MatMuls with a weight: the attention's activation x activation products
            # stay fp32, as in the dynamic recipe.
            extra_options={"MatMulConstBOnly": True},
        )


def _quantize_blockwise(model: Any, recipe: Int8Recipe, kept: set[str]) -> None:
    """Every MatMul by a 2-D weight (not in ``kept``) becomes a symmetric 8-bit MatMulNBits,
    in place. The weights are packed by ONNX Runtime's own kernel (the one its
    MatMulNBitsQuantizer calls; that class needs onnx_ir, which is not installed here)."""
    from onnx import helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    block = recipe.block_size
    nodes = []
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or node.name in kept or len(weight.dims) != 2:
            nodes.append(node)
            continue
        array = np.ascontiguousarray(numpy_helper.to_array(weight), dtype=np.float32)
        inner, outer = array.shape
        blocks = -(-inner // block)
        packed = np.zeros((outer, blocks, block), dtype=np.uint8)
        scales = np.zeros((outer, blocks), dtype=np.float32)
        zero_points = np.zeros((outer, blocks), dtype=np.uint8)  # unused: symmetric
        quantize_matmul_8bits(packed, array, scales, zero_points, block, outer, inner, True)
        packed_name, scales_name = f"{weight.name}_int8", f"{weight.name}_scales"
        graph.initializer.extend(
            [
                numpy_helper.from_array(packed, packed_name),
                numpy_helper.from_array(scales.reshape(-1), scales_name),
            ]
        )
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], packed_name, scales_name],
                [node.output[0]],
                name=f"{node.name}_int8",
                domain="com.microsoft",
                K=inner,
                N=outer,
                bits=8,
                block_size=block,
                accuracy_level=recipe.accuracy_level,
            )
        )
    used = {name for node in nodes for name in node.input}
    graph.ClearField("node")
    graph.node.extend(nodes)
    # The fp32 weights that were replaced.
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def measure_fidelity(fp32: Path, int8: Path, files: ModelFiles) -> dict[str, Any]:
    """Cosines (probes and gate texts, batched and alone) and top-10 neighbour agreement
    (gate texts) of the int8 export against fp32."""
    probes = list(PROBE_TEXTS)
    fidelity = cosines(probe_vectors(int8, files, probes), probe_vectors(fp32, files, probes))
    texts = gate_texts()
    got, want = (
        _embed_in_batches(
            OnnxRunner(export / MODEL_FILE, files, read_metadata(export)["inputs"]), texts
        )
        for export in (int8, fp32)
    )
    gate_cosines = cosines(got, want)
    return {
        "against": "onnx-fp32",
        "texts": len(texts) + len(probes),
        "min_cosine": min(fidelity["min_cosine"], gate_cosines["min_cosine"]),
        "mean_cosine": gate_cosines["mean_cosine"],
        "top10": neighbour_agreement(got, want),
    }


def _embed_in_batches(runner: OnnxRunner, texts: list[str], size: int = 16) -> np.ndarray:
    return np.concatenate(
        [runner.embed(texts[at : at + size]) for at in range(0, len(texts), size)]
    )


def neighbour_agreement(got: np.ndarray, want: np.ndarray, queries: int | None = None) -> float:
    """Mean share of each query text's 10 nearest neighbours (itself excluded) that two sets
    of unit vectors of the same texts agree on; ``queries`` spread evenly, default all."""
    picks = np.linspace(0, len(want) - 1, num=min(queries or len(want), len(want)), dtype=int)
    shared = sum(len(_nearest(got, query) & _nearest(want, query)) for query in picks)
    return shared / (NEIGHBOURS * len(picks))


def _nearest(vectors: np.ndarray, query: int) -> set[int]:
    scores = vectors @ vectors[query]
    scores[query] = -np.inf
    return set(np.argsort(-scores, kind="stable")[:NEIGHBOURS].tolist())
