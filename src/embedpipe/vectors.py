"""Shaping vectors for the wire: ``dimensions`` and base64 (as the ``openai`` SDK decodes it)."""

from __future__ import annotations

import base64

import numpy as np

from embedpipe.embedders import Vectors
from embedpipe.errors import InvalidInput


def check_dimensions(
    dimensions: int | None, model_dimensions: int, *, param: str = "dimensions"
) -> int | None:
    """``dimensions`` must be 1..the model's size; None (or the full size) means unchanged.
    A size of 0 is not known yet (an upstream model before its first answer): any positive
    ``dimensions`` goes, for the upstream to judge. ``param``: the field's name in a 400."""
    if dimensions is None or dimensions == model_dimensions:
        return None
    upper = model_dimensions or dimensions
    if isinstance(dimensions, bool) or not 1 <= dimensions <= upper:
        raise InvalidInput(
            f"'{param}' must be between 1 and {model_dimensions} for this model, got {dimensions}.",
            param=param,
        )
    return dimensions


def truncate(vectors: Vectors, dimensions: int | None) -> Vectors:
    """The first ``dimensions`` components, renormalised to unit length (Matryoshka style).
    Vectors already that size (an upstream model computed them so) are left as they are."""
    if dimensions is None or vectors.shape[1] <= dimensions:
        return vectors
    prefix = vectors[:, :dimensions]
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(prefix / norms, dtype=np.float32)


def to_base64(vector: Vectors) -> str:
    """Little-endian float32 bytes, base64: what the openai SDK's ``np.frombuffer`` expects."""
    return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
