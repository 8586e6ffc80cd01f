"""Compact output types (``embedding_type``) and the per-model calibration they need."""

from embedpipe.quantization.calibration import Calibration, load_calibration
from embedpipe.quantization.output_types import (
    EMBEDDING_TYPES,
    EmbeddingType,
    check_output_type,
    json_ready,
    output_layout,
    quantize,
    served_as,
    to_base64_of_type,
)
from embedpipe.quantization.served_rows import ServedRows

__all__ = [
    "EMBEDDING_TYPES",
    "Calibration",
    "EmbeddingType",
    "ServedRows",
    "check_output_type",
    "json_ready",
    "load_calibration",
    "output_layout",
    "quantize",
    "served_as",
    "to_base64_of_type",
]
