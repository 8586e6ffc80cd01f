"""Model backends behind one small protocol, and the registry of served models."""

from embedpipe.embedders.base import Embedder, ModelInfo, ServedModel, Vectors
from embedpipe.embedders.registry import (
    BUNDLED_MODEL,
    ModelRegistry,
    ModelSpec,
    configure_threads,
    load_embedder,
    parse_model_specs,
)

__all__ = [
    "BUNDLED_MODEL",
    "Embedder",
    "ModelInfo",
    "ModelRegistry",
    "ModelSpec",
    "ServedModel",
    "Vectors",
    "configure_threads",
    "load_embedder",
    "parse_model_specs",
]
