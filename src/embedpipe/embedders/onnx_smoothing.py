"""SmoothQuant on an fp32 ONNX graph, before int8 quantisation (``onnx_int8``): a few input
channels of a transformer's MatMuls carry values far larger than the rest, so one activation
scale per tensor wastes most of int8's range on them. Dividing channel j by s_j (and
multiplying the weight's row j by it) keeps every product the same and moves the difficulty
into the weights, which are quantised per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from embedpipe.embedders.calibration import CalibrationReader
from embedpipe.embedders.model_files import ModelFiles


def smooth(model: Any, alpha: float, files: ModelFiles, inputs: Sequence[str]) -> None:
    """SmoothQuant, in place: per group of MatMuls reading one activation, divide that
    activation's channels by s (a Mul on their own branch) and multiply the weights' rows by s."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    groups: dict[str, list[Any]] = {}
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    # Each group's input channel ranges over the calibration texts (the graph's own outputs).
    probe = _copy(model)
    probe.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in groups
    )
    session = onnxruntime.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    reader = CalibrationReader(files, inputs)
    ranges: dict[str, np.ndarray] = {}
    while (feed := reader.get_next()) is not None:
        outputs = session.run(list(groups), feed)
        for name, value in zip(groups, outputs, strict=True):
            seen = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            ranges[name] = np.maximum(ranges.get(name, seen), seen)
    for position, (name, nodes) in enumerate(groups.items()):
        arrays = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
        weight_range = np.max([np.abs(array).max(axis=1) for array in arrays], axis=0)
        scale = ranges[name] ** alpha / np.maximum(weight_range, 1e-5) ** (1 - alpha)
        scale = np.clip(scale, 1e-5, None).astype(np.float32)
        for node, array in zip(nodes, arrays, strict=True):
            weights[node.input[1]].CopyFrom(
                numpy_helper.from_array(array * scale[:, None], node.input[1])
            )
        divisor, smoothed = f"smooth_{position}_inverse", f"smooth_{position}_out"
        graph.initializer.append(numpy_helper.from_array(1.0 / scale, divisor))
        first = min(list(graph.node).index(node) for node in nodes)
        graph.node.insert(first, helper.make_node("Mul", [name, divisor], [smoothed]))
        for node in nodes:
            node.input[0] = smoothed


def _copy(model: Any) -> Any:
    import onnx

    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied
