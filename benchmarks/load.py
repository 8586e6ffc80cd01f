"""An async load generator for OpenAI-style ``/v1/embeddings`` servers (embedpipe, the naive
baseline, anything else that speaks the API), with the four workloads of the benchmark:

  batches   unique texts, 32 per request, a few clients (bulk indexing)
  singles   64 clients, one unique text per request (an app's online traffic)
  hot       64 clients, one already-cached text per request (requests/s of the cache path)
  zipf      64 clients drawing from 1,000 distinct texts with Zipf(s) popularity: the hit rate
            measured against the ideal of that exact stream (1 - distinct / total)

It uses aiohttp on uvloop with request bodies encoded up front, so that on a small shared
machine the client spends as little CPU as it can: every cycle it takes is a cycle the
server under test does not get. Responses are checked (status, and the number of vectors in
a sample of them) but not decoded, for the same reason.

    python -m benchmarks.load http://127.0.0.1:8000 --workload hot --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

MODEL = "all-MiniLM-L6-v2"
EMBEDDINGS_PATH = "/v1/embeddings"
# Every this many responses one is parsed to check it holds one vector per input.
_CHECK_EVERY = 50


@dataclass(frozen=True, slots=True)
class Request:
    """One request: its encoded body and how many texts it carries."""

    body: bytes
    texts: int


@dataclass(slots=True)
class Outcome:
    """What one workload measured on one server."""

    workload: str
    requests: int
    texts: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    hit_rate: float | None = None
    ideal_hit_rate: float | None = None

    @property
    def texts_per_second(self) -> float:
        return self.texts / self.seconds

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    def latency_ms(self, quantile: float) -> float:
        """Latency at ``quantile`` (nearest rank), in milliseconds."""
        ordered = sorted(self.latencies)
        rank = max(0, math.ceil(quantile * len(ordered)) - 1)
        return ordered[rank] * 1000


def embeddings_request(
    texts: Sequence[str] | str,
    encoding_format: str = "float",
    model: str = MODEL,
    embedding_type: str = "float32",
) -> Request:
    body = {"model": model, "input": texts, "encoding_format": encoding_format}
    if embedding_type != "float32":
        body["embedding_type"] = embedding_type
    return Request(orjson.dumps(body), 1 if isinstance(texts, str) else len(texts))


def zipf_stream(distinct: int, total: int, s: float, seed: int = 0) -> list[int]:
    """``total`` draws of text ranks 0..distinct-1, P(rank k) proportional to 1/(k+1)^s."""
    weights = [1.0 / (rank + 1) ** s for rank in range(distinct)]
    return random.Random(seed).choices(range(distinct), weights=weights, k=total)


def ideal_hit_rate(stream: Sequence[object]) -> float:
    """The best any cache can do on ``stream``: every first sight computes, every repeat hits."""
    return 1.0 - len(set(stream)) / len(stream)


class ServerError(RuntimeError):
    """The server under test answered something other than a good response."""


async def drive(
    base_url: str,
    requests: Sequence[Request],
    concurrency: int,
    *,
    path: str = EMBEDDINGS_PATH,
    request_timeout: float = 300.0,
) -> tuple[float, list[float]]:
    """Send ``requests`` in order from ``concurrency`` clients, each with its own connection;
    the wall time and each request's latency. Any non-200 answer raises ServerError."""
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    next_index = itertools.count()
    url = base_url.rstrip("/") + path
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def client() -> None:
            while (index := next(next_index)) < len(requests):
                request = requests[index]
                started = time.perf_counter()
                async with session.post(url, data=request.body, headers=headers) as reply:
                    body = await reply.read()
                latencies.append(time.perf_counter() - started)
                if reply.status != 200:
                    raise ServerError(f"{url} answered {reply.status}: {body[:300]!r}")
                if index % _CHECK_EVERY == 0:
                    _check(body, request, url)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def _check(body: bytes, request: Request, url: str) -> None:
    data = orjson.loads(body).get("data")
    if not isinstance(data, list) or len(data) != request.texts:
        raise ServerError(f"{url} answered {len(data or [])} vectors for {request.texts} texts")


# () -> (texts served, texts the model computed), as the server counts them.
ModelWorkProbe = Callable[[], tuple[int, int]]


async def run_batches(
    url: str, texts: Sequence[str], clients: int = 2, request_timeout: float = 300.0
) -> Outcome:
    """Unique texts, 32 per request, ``clients`` at a time (base64, as the SDK asks)."""
    requests = [
        embeddings_request(list(texts[i : i + 32]), "base64") for i in range(0, len(texts), 32)
    ]
    seconds, latencies = await drive(url, requests, clients, request_timeout=request_timeout)
    return Outcome("batches", len(requests), len(texts), seconds, latencies)


async def run_singles(
    url: str, texts: Sequence[str], clients: int = 64, request_timeout: float = 300.0
) -> Outcome:
    """One unique text per request from ``clients`` concurrent clients."""
    requests = [embeddings_request(text) for text in texts]
    seconds, latencies = await drive(url, requests, clients, request_timeout=request_timeout)
    return Outcome("singles", len(requests), len(texts), seconds, latencies)


async def run_hot(
    url: str,
    texts: Sequence[str],
    total: int,
    clients: int = 64,
    encoding_format: str = "float",
    path: str = EMBEDDINGS_PATH,
    embedding_type: str = "float32",
) -> Outcome:
    """``total`` requests for ``texts``, which are sent once first so that they are cached."""
    if path == EMBEDDINGS_PATH:
        await drive(url, [embeddings_request(list(texts), encoding_format)], 1, path=path)
    requests = [
        embeddings_request(texts[i % len(texts)], encoding_format, embedding_type=embedding_type)
        for i in range(total)
    ]
    seconds, latencies = await drive(url, requests, clients, path=path)
    return Outcome(f"hot ({encoding_format}, {embedding_type})", total, total, seconds, latencies)


async def run_zipf(
    url: str,
    texts: Sequence[str],
    total: int,
    model_work: ModelWorkProbe,
    clients: int = 64,
    s: float = 1.1,
) -> Outcome:
    """``total`` single-text requests over ``texts`` (never sent before) with Zipf popularity.
    The hit rate is the share of texts served that the model did not compute, read from the
    server (``model_work`` before and after): a text that waited for the same text's
    computation in another request counts as a hit, as it cost the model nothing."""
    stream = zipf_stream(len(texts), total, s)
    requests = [embeddings_request(texts[rank]) for rank in stream]
    served_before, computed_before = model_work()
    seconds, latencies = await drive(url, requests, clients)
    served_after, computed_after = model_work()
    served = served_after - served_before
    if served != total:
        raise ServerError(f"the server counted {served} texts served, {total} were sent")
    return Outcome(
        "zipf",
        total,
        total,
        seconds,
        latencies,
        hit_rate=1 - (computed_after - computed_before) / served,
        ideal_hit_rate=ideal_hit_rate(stream),
    )


def use_uvloop() -> None:
    """The client's event loop: uvloop (installed with uvicorn[standard]) costs less CPU."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--workload", choices=("batches", "singles", "hot"), default="hot")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--encoding-format", choices=("float", "base64"), default="float")
    args = parser.parse_args()
    from benchmarks.corpus import load_corpus

    use_uvloop()
    texts = load_corpus(min(args.requests, 1000))
    if args.workload == "batches":
        outcome = asyncio.run(run_batches(args.url, texts, args.clients))
    elif args.workload == "singles":
        outcome = asyncio.run(run_singles(args.url, texts, args.clients))
    else:
        outcome = asyncio.run(
            run_hot(args.url, texts[:64], args.requests, args.clients, args.encoding_format)
        )
    print(
        f"{outcome.workload}: {outcome.texts_per_second:.1f} texts/s "
        f"{outcome.requests_per_second:.1f} req/s "
        f"p50 {outcome.latency_ms(0.5):.1f} ms p95 {outcome.latency_ms(0.95):.1f} ms "
        f"p99 {outcome.latency_ms(0.99):.1f} ms"
    )


if __name__ == "__main__":
    main()
