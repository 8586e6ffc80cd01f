"""The sections that run models in a process of their own (spawned, so that what the backends
set up — torch's threads, OpenMP's waits in the environment — never reaches the servers this
process starts later): raw ``encode``, the limit every server is held against, and the
backends side by side with their fidelity to torch."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

from benchmarks.report.schema import BackendResult, Raw

T = TypeVar("T")


def in_child(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` in a fresh spawned process, which exits afterwards."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def raw_encode(batch_texts: list[str], single_texts: list[str]) -> Raw:
    """texts/s of raw ``SentenceTransformer.encode``: batches of 32 in arrival order (each
    padded to its longest text), and one text per call."""
    from benchmarks.throughput import RawModel

    raw = RawModel()
    batches = raw.texts_per_second(batch_texts)
    started = time.perf_counter()
    for text in single_texts:
        raw.model.encode([text], normalize_embeddings=True)
    singles = len(single_texts) / (time.perf_counter() - started)
    return Raw(batches_texts_per_s=batches, singles_texts_per_s=singles)


def backends(texts: list[str], rounds: int, queries: int, data_dir: Path) -> list[BackendResult]:
    """torch, ONNX fp32 and ONNX int8 on the batches the micro-batcher makes (benchmarks/
    backends.py), with each one's fidelity to torch."""
    from benchmarks.backends import backend_rows, load_backends, race, token_budget_batches
    from embedpipe.embedders import configure_threads
    from embedpipe.settings import BatchingSettings

    cores = configure_threads(0)  # as the service does, before torch is imported
    contenders = load_backends(data_dir, cores)
    torch_model = contenders[0].embedder
    batches = token_budget_batches(torch_model, texts, BatchingSettings().max_batch_tokens)  # type: ignore[arg-type]
    race(contenders, batches, rounds)
    return [
        BackendResult(
            backend=row.label,
            texts_per_s=row.rate,
            best_texts_per_s=row.best_rate,
            cos_mean=row.cos_mean,
            cos_min=row.cos_min,
            top10=row.top10,
        )
        for row in backend_rows(contenders, queries)
    ]
