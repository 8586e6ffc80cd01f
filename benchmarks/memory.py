"""``make bench-memory``: what the cache costs in memory.

1. Server RSS: a real ``embedpipe serve`` (embedded default) with the model loaded, with an
   empty L1 and with a full one. L1 is filled through the API without the model: entries (unit
   vectors under the keys the server derives) are written to its SQLite L2 before it starts,
   then requested 2,048 at a time, so every one is promoted into L1 as a real L2 hit would be.
2. Redis bytes per cached 384-d vector: ``INFO used_memory`` growth over 400 real entries
   (float32 packed as the tiered cache stores it, and float16; default TTL, written by the
   real tier, its connection closed before measuring) on a fresh private redis-server, and
   ``MEMORY USAGE`` per key; for comparison the raw float32 value as stored before the
   packing, and that with a key of the raw 32-byte digest and a short fingerprint.
3. float16 fidelity: the cosine between the model's float32 vectors of corpus texts and their
   float16 round trip.

    make bench-memory        # or: python -m benchmarks.memory --l1-mib 256
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

import httpx
import numpy as np
import redis

from benchmarks.corpus import load_corpus
from benchmarks.throughput import rss_mib
from embedpipe.cache import RedisTier, SqliteTier, VectorCodec, cache_key
from embedpipe.cache.memory import ENTRY_OVERHEAD
from embedpipe.cache.packing import pack_many
from embedpipe.embedders import BUNDLED_MODEL, load_embedder, parse_model_specs
from embedpipe.settings import CacheSettings, Settings
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess

_PER_REQUEST = 2048  # the API's default limit on inputs per request


def fill_texts(count: int) -> list[str]:
    return [f"memory benchmark entry {index}" for index in range(count)]


async def write_l2(path: Path, keys: list[str], dimensions: int, codec: VectorCodec) -> None:
    rng = np.random.default_rng(0)
    tier = await SqliteTier(path, 0, 0).open()
    try:
        for start in range(0, len(keys), 10_000):
            chunk = keys[start : start + 10_000]
            vectors = rng.standard_normal((len(chunk), dimensions)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            await tier.set_many(
                {key: codec.encode(vector) for key, vector in zip(chunk, vectors, strict=True)}
            )
    finally:
        await tier.close()


def server_rss(l1_mib: int, fingerprint: str, dimensions: int) -> dict[str, float]:
    """RSS of a server with the model loaded: L1 empty, then full."""
    settings = CacheSettings()
    codec = VectorCodec(settings.store_dtype)
    key_length = len(cache_key(settings.namespace, codec.fingerprint(fingerprint), "x"))
    per_entry = key_length + dimensions * 4 + ENTRY_OVERHEAD
    # 5% more than fit: the last ones evict the first, so L1 ends exactly full.
    count = int(l1_mib * 2**20 / per_entry * 1.05)
    texts = fill_texts(count)
    with tempfile.TemporaryDirectory(prefix="embedpipe-memory-") as tmp:
        data = Path(tmp) / "data"
        keys = [cache_key(settings.namespace, codec.fingerprint(fingerprint), t) for t in texts]
        asyncio.run(write_l2(data / "cache.sqlite3", keys, dimensions, codec))
        server = ServerProcess(
            {
                "EMBEDPIPE_DATA_DIR": str(data),
                "EMBEDPIPE_REDIS_URL": "",
                "EMBEDPIPE_CACHE__L1_MAX_BYTES": str(l1_mib * 2**20),
            },
            Path(tmp) / "server.log",
        ).start()
        try:
            assert server.process is not None
            empty = rss_mib(server.process.pid)
            with httpx.Client(base_url=server.url, timeout=300) as http:
                for start in range(0, count, _PER_REQUEST):
                    body = {
                        "model": BUNDLED_MODEL,
                        "input": texts[start : start + _PER_REQUEST],
                        "encoding_format": "base64",
                    }
                    http.post("/v1/embeddings", json=body).raise_for_status()
                l1 = http.get("/stats").json()["cache"]["l1"]
            full = rss_mib(server.process.pid)
        finally:
            server.stop()
    return {
        "empty": empty,
        "full": full,
        "entries": l1["entries"],
        "l1_mib": l1["bytes"] / 2**20,
    }


# The measurement: INFO used_memory growth over this many entries, default TTL.
REDIS_ENTRIES = 400


async def _redis_entry(keys: list[str | bytes], values: list[bytes]) -> dict[str, float]:
    """Bytes per entry on a fresh private redis-server: ``used_memory`` growth once the writer
    (the real RedisTier, default TTL) has disconnected, so its buffers are not counted."""
    with (
        tempfile.TemporaryDirectory(prefix="embedpipe-redis-") as tmp,
        RedisServer.start_new(Path(tmp)) as server,
    ):
        probe = redis.Redis.from_url(server.url)
        try:
            before = int(probe.info("memory")["used_memory"])
            tier = RedisTier.from_url(server.url, CacheSettings())
            try:
                await tier.set_many(dict(zip(keys, values, strict=True)))  # type: ignore[arg-type]
            finally:
                await tier.close()
            after = int(probe.info("memory")["used_memory"])
            usage = [probe.memory_usage(key, samples=0) or 0 for key in keys]
            return {
                "used_memory_per_entry": (after - before) / len(keys),
                "memory_usage": float(np.mean(usage)),
                "key_bytes": float(len(keys[0])),
                "value_bytes": float(len(values[0])),
                "ttl": float(probe.ttl(keys[0])),
            }
        finally:
            probe.close()


async def redis_bytes(fingerprint: str, vectors: np.ndarray) -> dict[str, dict[str, float]]:
    """Bytes per cached vector in Redis: the real keys and values as the tiered cache stores
    them (float32 packed, and float16), and for comparison the unpacked float32 value, alone
    and with a key of the raw 32-byte digest and a short fingerprint."""
    rows = [vectors[i % len(vectors)] for i in range(REDIS_ENTRIES)]
    namespace = CacheSettings().namespace
    out: dict[str, dict[str, float]] = {}
    for dtype in ("float32", "float16"):
        codec = VectorCodec(dtype)
        prefix = codec.fingerprint(fingerprint)
        keys: list[str | bytes] = [
            cache_key(namespace, prefix, f"{dtype} {i}") for i in range(REDIS_ENTRIES)
        ]
        out[dtype] = await _redis_entry(keys, pack_many([codec.encode(row) for row in rows]))
    plain: list[str | bytes] = [
        cache_key(namespace, fingerprint, f"plain {i}") for i in range(REDIS_ENTRIES)
    ]
    out["float32, unpacked value"] = await _redis_entry(
        plain, [r.astype("<f4").tobytes() for r in rows]
    )
    short: list[str | bytes] = [
        f"{namespace}:".encode()
        + bytes.fromhex(fingerprint[:8])
        + hashlib.sha256(f"short {i}".encode()).digest()
        for i in range(REDIS_ENTRIES)
    ]
    out["float32, unpacked value, raw-digest key"] = await _redis_entry(
        short, [r.astype("<f4").tobytes() for r in rows]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1-mib", type=int, default=Settings().cache.l1_max_bytes // 2**20)
    parser.add_argument("--texts", type=int, default=256, help="real vectors for Redis/fidelity")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    embedder = load_embedder(parse_model_specs(BUNDLED_MODEL, "")[0], Settings())
    texts = load_corpus(args.texts)
    vectors = np.concatenate(
        [embedder.embed(texts[start : start + 32]) for start in range(0, len(texts), 32)]
    )
    half = np.stack([VectorCodec("float16").round_trip(v) for v in vectors])
    cosines = (half * vectors).sum(axis=1) / np.linalg.norm(half, axis=1)
    print(
        f"float16 fidelity over {len(texts)} corpus vectors: cosine to float32 min "
        f"{cosines.min():.7f}, mean {cosines.mean():.7f}; largest component error "
        f"{np.abs(half - vectors).max():.2e}"
    )
    for dtype, numbers in asyncio.run(redis_bytes(embedder.fingerprint, vectors)).items():
        print(
            f"Redis, {dtype}: {numbers['used_memory_per_entry']:,.0f} B per entry "
            f"(INFO used_memory over {REDIS_ENTRIES} entries, TTL set, writer disconnected); "
            f"MEMORY USAGE {numbers['memory_usage']:,.0f} B (key {numbers['key_bytes']:.0f} B, "
            f"value {numbers['value_bytes']:.0f} B)"
        )
    rss = server_rss(args.l1_mib, embedder.fingerprint, embedder.info.dimensions)
    print(
        f"server RSS, model loaded: {rss['empty']:,.0f} MiB with L1 empty, {rss['full']:,.0f} MiB "
        f"with L1 full ({rss['entries']:,.0f} entries, {rss['l1_mib']:,.0f} MiB by its own "
        f"accounting, limit {args.l1_mib} MiB)"
    )


if __name__ == "__main__":
    main()
