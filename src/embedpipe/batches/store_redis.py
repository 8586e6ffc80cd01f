"""The distributed job store, in the broker Redis (``noeviction``): job state must never be
evicted the way cache entries are.

A batch is a hash with one JSON-encoded field per top-level attribute, so concurrent writers
(an API replica cancelling, a worker finalising) touch only their own fields; status changes
are compare-and-set in one Lua script.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from embedpipe.batches.objects import ACTIVE_STATUSES, JsonDict
from embedpipe.batches.store import ChunkCounts

# KEYS: batch hash, active set. ARGV: new status (JSON), batch id, is-active flag,
# allowed statuses (JSON array of JSON strings), then field/value pairs.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
for _, allowed in ipairs(cjson.decode(ARGV[4])) do
  if allowed == current then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[2])
    else redis.call('SREM', KEYS[2], ARGV[2]) end
    return 1
  end
end
return 0
"""

_INTERNAL = ("_finalize",)


class RedisJobStore:
    def __init__(self, client: Redis, namespace: str) -> None:
        self._redis = client
        self._prefix = f"{namespace}:jobs"
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str, namespace: str) -> RedisJobStore:
        # Job state is not on the request's hot path, but must never hang it forever.
        client = Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        return cls(client, namespace)

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def put_file(self, file: JsonDict) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key("file", file["id"]), json.dumps(file))
            pipe.zadd(self._key("files"), {file["id"]: file["created_at"]})
            pipe.zadd(self._key("files", file["purpose"]), {file["id"]: file["created_at"]})
            await pipe.execute()

    async def get_file(self, file_id: str) -> JsonDict | None:
        raw = await self._redis.get(self._key("file", file_id))
        return _load(raw) if raw else None

    async def delete_file(self, file_id: str) -> bool:
        file = await self.get_file(file_id)
        if file is None:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("file", file_id))
            pipe.zrem(self._key("files"), file_id)
            pipe.zrem(self._key("files", file["purpose"]), file_id)
            await pipe.execute()
        return True

    async def _page(self, index_key: str, after: str | None, limit: int) -> list[str]:
        start = 0
        if after:
            rank: Any = await self._redis.zrevrank(index_key, after)
            if rank is None:
                return []
            start = int(rank) + 1
        ids: Any = await self._redis.zrevrange(index_key, start, start + limit - 1)
        return [_text(item) for item in ids]

    async def list_files(
        self, purpose: str | None, after: str | None, limit: int
    ) -> list[JsonDict]:
        index = self._key("files", purpose) if purpose else self._key("files")
        ids = await self._page(index, after, limit)
        if not ids:
            return []
        raws = await self._redis.mget([self._key("file", file_id) for file_id in ids])
        return [_load(raw) for raw in raws if raw]

    async def put_batch(self, batch: JsonDict) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("batch", batch["id"]), mapping=_encode(batch))
            pipe.zadd(self._key("batches"), {batch["id"]: batch["created_at"]})
            if batch["status"] in ACTIVE_STATUSES:
                pipe.sadd(self._key("batches", "active"), batch["id"])
            await pipe.execute()

    async def get_batch(self, batch_id: str) -> JsonDict | None:
        raw = await self._redis.hgetall(self._key("batch", batch_id))
        return _decode(raw) if raw else None

    async def update_batch(self, batch_id: str, fields: JsonDict) -> None:
        if "status" in fields:
            raise ValueError("status changes go through transition()")
        if await self._redis.exists(self._key("batch", batch_id)):
            await self._redis.hset(self._key("batch", batch_id), mapping=_encode(fields))

    async def transition(
        self, batch_id: str, to: str, allowed_from: Sequence[str], fields: JsonDict | None = None
    ) -> bool:
        pairs = [item for pair in _encode(fields or {}).items() for item in pair]
        changed = await self._transition(
            keys=[self._key("batch", batch_id), self._key("batches", "active")],
            args=[
                json.dumps(to),
                batch_id,
                "1" if to in ACTIVE_STATUSES else "0",
                json.dumps([json.dumps(status) for status in allowed_from]),
                *pairs,
            ],
        )
        return bool(changed)

    async def list_batches(self, after: str | None, limit: int) -> list[JsonDict]:
        ids = await self._page(self._key("batches"), after, limit)
        found = [await self.get_batch(batch_id) for batch_id in ids]
        return [batch for batch in found if batch is not None]

    async def active_batch_ids(self) -> list[str]:
        members = await self._redis.smembers(self._key("batches", "active"))
        return sorted(_text(member) for member in members)

    async def commit_chunk(self, batch_id: str, index: int, completed: int, failed: int) -> bool:
        added = await self._redis.hsetnx(
            self._key("batch", batch_id, "chunks"), str(index), f"{completed}:{failed}"
        )
        return bool(added)

    async def chunk_done(self, batch_id: str, index: int) -> bool:
        return bool(await self._redis.hexists(self._key("batch", batch_id, "chunks"), str(index)))

    async def chunk_counts(self, batch_id: str) -> ChunkCounts:
        chunks = await self._redis.hgetall(self._key("batch", batch_id, "chunks"))
        completed = failed = 0
        for value in chunks.values():
            done, _, bad = _text(value).partition(":")
            completed += int(done)
            failed += int(bad)
        return ChunkCounts(done=len(chunks), completed=completed, failed=failed)

    async def claim_finalize(self, batch_id: str) -> bool:
        return bool(await self._redis.hsetnx(self._key("batch", batch_id), "_finalize", "1"))

    async def close(self) -> None:
        await self._redis.aclose()


def _encode(fields: JsonDict) -> dict[Any, str]:
    return {key: json.dumps(value) for key, value in fields.items()}


def _decode(raw: dict[Any, Any]) -> JsonDict:
    decoded: JsonDict = {}
    for key, value in raw.items():
        name = _text(key)
        if name not in _INTERNAL:
            decoded[name] = json.loads(value)
    return decoded


def _load(raw: bytes | str) -> JsonDict:
    loaded: JsonDict = json.loads(raw)
    return loaded


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
