"""Where File and Batch records and chunk progress live.

    JobStore (protocol)
    ├── SqliteJobStore   embedded default: one process, under the data dir
    └── RedisJobStore    distributed: the broker Redis (never the evicting cache Redis),
                         shared by every API replica and Celery worker

Chunk completion is idempotent: a chunk counts once however often its task runs, which is
what makes a retried or duplicated task harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from embedpipe.batches.objects import JsonDict


@dataclass(frozen=True, slots=True)
class ChunkCounts:
    done: int  # chunks committed (or skipped after a cancel)
    completed: int  # requests that succeeded in those chunks
    failed: int  # requests that failed in those chunks


class JobStore(Protocol):
    async def put_file(self, file: JsonDict) -> None: ...

    async def get_file(self, file_id: str) -> JsonDict | None: ...

    async def delete_file(self, file_id: str) -> bool: ...

    async def list_files(
        self, purpose: str | None, after: str | None, limit: int
    ) -> list[JsonDict]:
        """Newest first, starting after the id ``after``."""
        ...

    async def put_batch(self, batch: JsonDict) -> None: ...

    async def get_batch(self, batch_id: str) -> JsonDict | None: ...

    async def update_batch(self, batch_id: str, fields: JsonDict) -> None:
        """Set top-level fields (never ``status``: use ``transition``)."""
        ...

    async def transition(
        self, batch_id: str, to: str, allowed_from: Sequence[str], fields: JsonDict | None = None
    ) -> bool:
        """Set the status (and fields) only if the current status is in ``allowed_from``."""
        ...

    async def list_batches(self, after: str | None, limit: int) -> list[JsonDict]: ...

    async def active_batch_ids(self) -> list[str]: ...

    async def commit_chunk(self, batch_id: str, index: int, completed: int, failed: int) -> bool:
        """Record a chunk as done; False when it already was (a duplicate run)."""
        ...

    async def chunk_done(self, batch_id: str, index: int) -> bool: ...

    async def chunk_counts(self, batch_id: str) -> ChunkCounts: ...

    async def claim_finalize(self, batch_id: str) -> bool:
        """True for exactly one caller per batch: the one that assembles the output."""
        ...

    async def close(self) -> None: ...
