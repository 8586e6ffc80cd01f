"""Recall@10 of each output type (``embedding_type``) against float32, on a held corpus (a slice
of the benchmark corpus that the calibration corpus does not hold), with and without
rescoring the type's top 40 with the float32 vectors.

    make bench-recall            # or: python -m benchmarks.recall_types --docs 1000 --queries 100

For each query text, the truth is its 10 nearest documents by float32 cosine. Each type
ranks the documents with its own vectors, as a vector store would: float16 and int8/uint8 by
dot product (uint8 centred at 128, so it ranks as int8 does), binary/ubinary by Hamming
distance. "rescored": the type's top 40, reordered by float32 cosine. Query and documents go
through ``embedpipe.quantization.quantize`` with the bundled model's shipped ranges: the bytes
the service answers.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from benchmarks.corpus import load_corpus
from embedpipe.embedders import Embedder, load_embedder, parse_model_specs
from embedpipe.quantization import EMBEDDING_TYPES, EmbeddingType, load_calibration, quantize
from embedpipe.settings import Settings

console = Console(width=120)
NEIGHBOURS = 10
RESCORE = 40
BATCH = 32
# The calibration corpus is the first 256 texts of the benchmark corpus: the held corpus
# starts well after it.
HELD_OFFSET = 1000


def _embed(embedder: Embedder, texts: list[str]) -> npt.NDArray[np.float32]:
    texts = embedder.clip(texts)
    return np.concatenate(
        [embedder.embed(texts[start : start + BATCH]) for start in range(0, len(texts), BATCH)]
    )


def _scores(
    queries: npt.NDArray[np.generic], docs: npt.NDArray[np.generic], kind: EmbeddingType
) -> npt.NDArray[np.float64]:
    """Higher is nearer, as a vector store would rank ``kind``'s vectors."""
    if kind.endswith("binary"):
        query_bits = np.unpackbits(queries.view(np.uint8), axis=1).astype(np.int32)
        doc_bits = np.unpackbits(docs.view(np.uint8), axis=1).astype(np.int32)
        # -Hamming distance = matches - length: the same order as the number of equal bits.
        equal = query_bits @ doc_bits.T + (1 - query_bits) @ (1 - doc_bits).T
        return equal.astype(np.float64)
    as_numbers = queries.astype(np.float64), docs.astype(np.float64)
    if kind == "uint8":
        as_numbers = as_numbers[0] - 128, as_numbers[1] - 128
    return as_numbers[0] @ as_numbers[1].T


def _top(scores: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.intp]:
    # Stable: ties (frequent with Hamming distances) keep the documents' order.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_table(
    embedder: Embedder, calibration_dir: Path, docs: int, queries: int
) -> list[tuple[str, float, float]]:
    texts = load_corpus(docs + queries, offset=HELD_OFFSET)
    doc_vectors = _embed(embedder, texts[:docs])
    query_vectors = _embed(embedder, texts[docs:])
    calibration = load_calibration(embedder, calibration_dir)
    exact = (query_vectors @ doc_vectors.T).astype(np.float64)
    truth = _top(exact, NEIGHBOURS)
    rows: list[tuple[str, float, float]] = []
    for kind in EMBEDDING_TYPES:
        scores = _scores(
            quantize(query_vectors, kind, calibration),
            quantize(doc_vectors, kind, calibration),
            kind,
        )
        plain = _top(scores, NEIGHBOURS)
        candidates = _top(scores, RESCORE)
        rescored_order = np.argsort(
            -np.take_along_axis(exact, candidates, axis=1), axis=1, kind="stable"
        )[:, :NEIGHBOURS]
        rescored = np.take_along_axis(candidates, rescored_order, axis=1)
        rows.append((kind, _recall(plain, truth), _recall(rescored, truth)))
    return rows


def _recall(found: npt.NDArray[np.intp], truth: npt.NDArray[np.intp]) -> float:
    hits = [len(set(row) & set(want)) for row, want in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / NEIGHBOURS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    # The bundled model's record ships with the package: nothing is written here.
    with tempfile.TemporaryDirectory(prefix="bench-recall-") as data_dir:
        settings = Settings(data_dir=Path(data_dir))
        spec = parse_model_specs(settings.model, "")[0]
        embedder = load_embedder(spec, settings)
        rows = recall_table(embedder, Path(data_dir), args.docs, args.queries)
    table = Table(
        title=f"recall@{NEIGHBOURS} against float32: {spec.name}, {args.docs} documents, "
        f"{args.queries} queries (benchmark corpus from text {HELD_OFFSET}, Python "
        f"{platform.python_version()}), {datetime.date.today()}"
    )
    table.add_column("embedding_type")
    table.add_column(f"recall@{NEIGHBOURS}", justify="right")
    table.add_column(f"top {RESCORE} rescored with float32", justify="right")
    for kind, plain, rescored in rows:
        table.add_row(kind, f"{plain:.3f}", f"{rescored:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
