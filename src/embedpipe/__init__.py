"""embedpipe: a production embedding service (OpenAI-compatible API, batching, tiered cache)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
