"""``make bench`` (rerank): a real ``embedpipe serve`` reranking with a cross-encoder against
raw ``CrossEncoder.predict`` in batches of 32, in one run on the same corpus and machine.

    python -m benchmarks.rerank --queries 16 --documents 64

The cross-encoder is the tests' (tests/cross_encoder.py: the bundled MiniLM with a seeded
one-label head): the same size as ms-marco-MiniLM-L6, so its speed is a real reranker's.

Workloads, 4 clients, each request one query over ``--documents`` corpus passages:
  unique     new queries: every pair is computed
  repeated   the same requests again: every pair's score comes from the cache
  cosine     the embedding model over documents it embedded before: only queries computed
Raw ``predict`` runs just before and after the unique workload; the ratio uses the mean.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from benchmarks.corpus import load_corpus
from benchmarks.load import use_uvloop
from benchmarks.throughput import machine
from tests.cross_encoder import CROSS_ENCODER, build_cross_encoder
from tests.server_process import ServerProcess

console = Console(stderr=True)  # progress; the report goes to stdout
CLIENTS = 4
MODEL = "all-MiniLM-L6-v2"


def raw_pairs_per_second(model: Any, pairs: list[tuple[str, str]]) -> float:
    """``CrossEncoder.predict`` in batches of 32, as its documentation calls it."""
    started = time.perf_counter()
    for offset in range(0, len(pairs), 32):
        model.predict(pairs[offset : offset + 32], batch_size=32, show_progress_bar=False)
    return len(pairs) / (time.perf_counter() - started)


async def served_pairs_per_second(
    url: str, model: str, queries: list[str], documents: list[str]
) -> float:
    """Pairs ranked per second by ``CLIENTS`` concurrent clients, one request per query."""
    pending = list(queries)

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            query = pending.pop()
            body = {"model": model, "query": query, "documents": documents}
            reply = await http.post("/v1/rerank", json=body)
            reply.raise_for_status()

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    return len(queries) * len(documents) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--documents", type=int, default=64)
    plan = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # As the server runs torch (embedders/registry.py configure_threads): with OpenMP's
    # busy-waiting threads on a shared machine, raw predict would measure contention.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    use_uvloop()
    import torch
    from sentence_transformers import CrossEncoder

    from embedpipe.embedders.registry import available_cores

    torch.set_num_threads(available_cores())
    started = machine()
    documents = load_corpus(plan.documents, 0)
    queries = [text[:200] for text in load_corpus(3 * plan.queries, plan.documents)]
    unique, cosine = queries[: plan.queries], queries[plan.queries : 2 * plan.queries]
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-rerank-") as tmp:
        workdir = Path(tmp)
        model_dir = build_cross_encoder(workdir / "ranker")
        raw = CrossEncoder(str(model_dir), device="cpu", local_files_only=True)
        pairs = [(query, document) for query in unique for document in documents]
        raw.predict(pairs[:32], show_progress_bar=False)  # warm up
        server = ServerProcess(
            {
                "EMBEDPIPE_DATA_DIR": str(workdir / "data"),
                "EMBEDPIPE_REDIS_URL": "",
                "EMBEDPIPE_MODEL_THREADS": "0",  # every usable core, as in production
                "EMBEDPIPE_EXTRA_MODELS": f"{CROSS_ENCODER}=cross-encoder:{model_dir}",
            },
            workdir / "embedpipe.log",
        )
        with server.start():
            before = raw_pairs_per_second(raw, pairs)
            console.print(f"  raw predict       {before:8,.1f} pairs/s")
            fresh = asyncio.run(
                served_pairs_per_second(server.url, CROSS_ENCODER, unique, documents)
            )
            console.print(f"  embedpipe unique  {fresh:8,.1f} pairs/s")
            after = raw_pairs_per_second(raw, pairs)
            console.print(f"  raw predict       {after:8,.1f} pairs/s (after)")
            cached = asyncio.run(
                served_pairs_per_second(server.url, CROSS_ENCODER, unique, documents)
            )
            console.print(f"  embedpipe repeat  {cached:8,.1f} pairs/s")
            httpx.post(
                f"{server.url}/v1/embeddings",
                json={"model": MODEL, "input": documents},
                timeout=600,
            ).raise_for_status()
            by_cosine = asyncio.run(served_pairs_per_second(server.url, MODEL, cosine, documents))
            console.print(f"  embedpipe cosine  {by_cosine:8,.1f} pairs/s")
    raw_rate = (before + after) / 2
    print(
        "\n".join(
            [
                f"Machine: {started} at the start, "
                f"{machine().rpartition('load average ')[2]} at the end.",
                f"{plan.queries} queries x {plan.documents} corpus passages, {CLIENTS} clients.",
                "",
                "| rerank workload | raw `predict`, batches of 32 (pairs/s) | embedpipe "
                "(pairs/s) | embedpipe / raw |",
                "| --- | ---: | ---: | ---: |",
                f"| unique queries, cross-encoder | {raw_rate:,.1f} | {fresh:,.1f} "
                f"| {fresh / raw_rate:.2f} (goal ≥ 1.0) |",
                f"| repeated queries, cross-encoder (cache) | {raw_rate:,.1f} | {cached:,.1f} "
                f"| {cached / raw_rate:.2f} |",
                f"| cosine, embedding model, documents cached | - | {by_cosine:,.1f} | - |",
            ]
        )
    )


if __name__ == "__main__":
    main()
