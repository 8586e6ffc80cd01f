"""The simple API's output step (``/embed``, ``/embed/batch``): full vectors, as JSON numbers
of the asked ``embedding_type``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from embedpipe.quantization import EmbeddingType, check_output_type, json_ready, served_as
from embedpipe.service import EmbeddingService

Shape = Callable[[npt.NDArray[np.float32]], list[npt.NDArray[np.generic]]]


def output_shape(service: EmbeddingService, model: str, embedding_type: EmbeddingType) -> Shape:
    """What turns the model's vectors into the answer's rows; InvalidInput (before any work)
    when the model cannot give ``embedding_type``."""
    info = service.models.get(model).info
    calibration = service.calibration(model)
    check_output_type(embedding_type, info.dimensions, calibration)

    def shape(vectors: npt.NDArray[np.float32]) -> list[npt.NDArray[np.generic]]:
        rows = served_as(info.name, vectors, embedding_type, calibration, service.served_rows)
        return [json_ready(row) for row in rows]

    return shape
