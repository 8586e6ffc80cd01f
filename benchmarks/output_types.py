"""What a cache hit costs the server's code per ``embedding_type``, without the network:
the real application in this process, requests handed to it as ASGI calls one at a time, the
types interleaved request by request so that drift and the other tenants' bursts weigh on
each alike. Part of ``make bench`` (``make bench`` also measures the same through HTTP, where
the load generator shares the cores and a round's ratio moves by +-15%).

    python -m benchmarks.output_types [--requests 6000]

The CPU time of the calling thread (every step of a hit runs on the event loop) for each
request, median and quartiles per type and the median's ratio to float32's. The texts are
cached before timing; ``float`` encoding (JSON numbers), one text per request, as the
issue-16 goal reads: int8 and binary hits cost no more server time than float32's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson

from benchmarks.corpus import load_corpus
from embedpipe.api.app import create_app
from embedpipe.embedders import BUNDLED_MODEL
from embedpipe.settings import Settings

TYPES = ("float32", "int8", "binary")
TEXTS = 64

Message = MutableMapping[str, Any]
App = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


def _scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/embeddings",
        "raw_path": b"/v1/embeddings",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def post(app: App, body: bytes) -> bytes:
    """One request through the whole application (its middleware included); the body."""
    delivered = False
    answer: list[Message] = []

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            await asyncio.Event().wait()  # nobody disconnects
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        answer.append(message)

    await app(_scope(body), receive, send)
    if answer[0]["status"] != 200:
        raise RuntimeError(f"status {answer[0]['status']}: {answer[1:]}")
    return b"".join(message.get("body", b"") for message in answer[1:])


def request_body(text: str | list[str], embedding_type: str) -> bytes:
    body: dict[str, Any] = {"model": BUNDLED_MODEL, "input": text, "encoding_format": "float"}
    if embedding_type != "float32":  # as a client that wants float32 sends it
        body["embedding_type"] = embedding_type
    return orjson.dumps(body)


async def measure(requests: int) -> dict[str, list[int]]:
    """Per type, the thread CPU nanoseconds of each of ``requests`` cache hits."""
    texts = load_corpus(TEXTS)
    costs: dict[str, list[int]] = {kind: [] for kind in TYPES}
    with tempfile.TemporaryDirectory(prefix="embedpipe-types-") as tmp:
        app = create_app(Settings(data_dir=Path(tmp), redis_url=""))
        async with app.router.lifespan_context(app):
            await post(app, request_body(texts, "float32"))  # cached from here on
            bodies = {kind: [request_body(text, kind) for text in texts] for kind in TYPES}
            for kind in TYPES:  # each path run once before timing
                for body in bodies[kind]:
                    await post(app, body)
            for number in range(requests):
                for kind in TYPES:
                    started = time.thread_time_ns()
                    await post(app, bodies[kind][number % TEXTS])
                    costs[kind].append(time.thread_time_ns() - started)
    return costs


def report(costs: dict[str, list[int]]) -> str:
    float_median = statistics.median(costs["float32"])
    lines = [
        "| cache hit in process, one text, JSON numbers | CPU µs a request, p25 / median / p75 "
        "| median / float32's |",
        "| --- | ---: | ---: |",
    ]
    for kind in TYPES:
        low, median, high = statistics.quantiles(costs[kind], n=4)
        lines.append(
            f"| {kind} | {low / 1e3:.1f} / {median / 1e3:.1f} / {high / 1e3:.1f} "
            f"| {median / float_median:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000, help="timed requests per type")
    plan = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(report(asyncio.run(measure(plan.requests))))


if __name__ == "__main__":
    main()
