"""Output types (``embedding_type``): compact vectors made from the float32 ones after the
cache, exactly as sentence-transformers' ``quantize_embeddings`` makes them.

* ``float32`` (the default) and ``float16``: the vector, rounded for float16;
* ``int8`` / ``uint8``: each component cut into 256 buckets between the model's calibrated
  minimum and maximum for that dimension (``calibration.py``), so a text always gives the
  same bytes, whatever it was batched with;
* ``binary`` / ``ubinary``: the sign bits, 8 to a byte (big-endian bit order, as
  ``np.packbits``); ``binary`` is that byte minus 128 as a signed int8, as Cohere returns it.

``encoding_format`` keeps its meaning: ``float`` gives JSON numbers (integers for the integer
types), ``base64`` the raw little-endian bytes of the type.
"""

from __future__ import annotations

import base64
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from embedpipe import metrics
from embedpipe.errors import InvalidInput
from embedpipe.quantization.calibration import Calibration
from embedpipe.quantization.served_rows import ServedRows

EmbeddingType = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
EMBEDDING_TYPES: tuple[EmbeddingType, ...] = get_args(EmbeddingType)
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "binary": np.dtype("i1"),
    "ubinary": np.dtype("u1"),
}
_BUCKETS = 255  # intervals between a dimension's minimum and maximum: levels 0..255


def output_layout(embedding_type: EmbeddingType, dimensions: int) -> tuple[int, np.dtype[Any]]:
    """Values per vector and their little-endian dtype, for ``dimensions``-wide vectors."""
    width = dimensions // 8 if embedding_type.endswith("binary") else dimensions
    return width, _WIRE_DTYPES[embedding_type]


def check_output_type(
    embedding_type: EmbeddingType,
    width: int,
    calibration: Calibration | None,
    *,
    param: str = "embedding_type",
    dimensions_param: str | None = None,
) -> None:
    """InvalidInput when ``embedding_type`` cannot be made for vectors of ``width`` components
    (0: not known yet) of a model with this ``calibration`` (None: the model has none).
    ``dimensions_param``: the field that asked for that width, if the client chose it."""
    if embedding_type.endswith("binary") and width % 8:
        raise InvalidInput(
            f"'{embedding_type}' packs 8 dimensions to a byte: the size must be a multiple of 8, "
            f"got {width}.",
            param=dimensions_param or param,
        )
    if embedding_type.endswith("int8") and calibration is None:
        raise InvalidInput(
            f"'{embedding_type}' needs the model's calibrated ranges, and this model has none "
            "(an upstream model): use float32, float16, binary or ubinary.",
            param=param,
        )


def served_as(
    model: str,
    vectors: npt.NDArray[np.float32],
    embedding_type: EmbeddingType,
    calibration: Calibration | None = None,
    remembered: ServedRows | None = None,
) -> npt.NDArray[np.generic]:
    """:func:`quantize`, counted in the metrics as vectors served of that type; through
    ``remembered`` (read-only rows) when given: cache hits serve the same rows again."""
    metrics.EMBEDDING_OUTPUTS.labels(model=model, type=embedding_type).inc(len(vectors))
    if remembered is None:
        return quantize(vectors, embedding_type, calibration)
    return remembered.served(
        vectors, embedding_type, calibration, lambda: quantize(vectors, embedding_type, calibration)
    )


def quantize(
    vectors: npt.NDArray[np.float32],
    embedding_type: EmbeddingType,
    calibration: Calibration | None = None,
) -> npt.NDArray[np.generic]:
    """``vectors`` (rows, already cut to size) as ``embedding_type``: byte for byte what
    ``quantize_embeddings(vectors, precision, ranges=calibration.ranges(width))`` gives."""
    if embedding_type == "float32":
        return vectors
    if embedding_type == "float16":
        return vectors.astype(np.float16)
    if embedding_type in ("int8", "uint8"):
        if calibration is None:
            raise ValueError("int8 and uint8 need a calibration")
        starts, steps = calibration.buckets(vectors.shape[1])
        levels: npt.NDArray[np.float32] = np.subtract(vectors, starts)
        np.divide(levels, steps, out=levels)
        # clip(levels, 0, 255), in place: np.clip costs more than the rest on one vector.
        # Clipped first, the cast's truncation is quantize_embeddings' floor.
        np.minimum(np.maximum(levels, 0, out=levels), _BUCKETS, out=levels)
        unsigned = levels.astype(np.uint8)
        if embedding_type == "uint8":
            return unsigned
        # level - 128 as int8 is the level with its top bit flipped (two's complement).
        np.bitwise_xor(unsigned, 0x80, out=unsigned)
        return unsigned.view(np.int8)
    packed = np.packbits(vectors > 0, axis=-1)
    if embedding_type == "ubinary":
        return packed
    # uint8 arithmetic wraps, as in quantize_embeddings: 0 -> -128, 255 -> 127.
    return (packed - 128).astype(np.int8)


def json_ready(row: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """A row orjson writes as JSON numbers (it has no float16: those go as float32, the same
    values)."""
    return row.astype(np.float32) if row.dtype == np.float16 else row


def to_base64_of_type(row: npt.NDArray[np.generic], embedding_type: EmbeddingType) -> str:
    """The row's raw little-endian bytes of its type, base64."""
    raw = row.astype(_WIRE_DTYPES[embedding_type], copy=False).tobytes()
    return base64.b64encode(raw).decode("ascii")
