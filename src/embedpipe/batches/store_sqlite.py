"""The embedded job store: SQLite under the data dir (one server process owns it)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from embedpipe.batches.objects import ACTIVE_STATUSES, JsonDict
from embedpipe.batches.store import ChunkCounts

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, purpose TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, doc TEXT NOT NULL,
    finalize_claimed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chunks (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, completed INTEGER NOT NULL,
    failed INTEGER NOT NULL, PRIMARY KEY (batch_id, idx));
"""


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._db)

        return await asyncio.to_thread(locked)

    async def put_file(self, file: JsonDict) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                (file["id"], file["created_at"], file["purpose"], json.dumps(file)),
            )
        )

    async def get_file(self, file_id: str) -> JsonDict | None:
        row = await self._run(
            lambda db: db.execute("SELECT doc FROM files WHERE id = ?", (file_id,)).fetchone()
        )
        return _load(row[0]) if row else None

    async def delete_file(self, file_id: str) -> bool:
        cursor = await self._run(
            lambda db: db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        )
        return cursor.rowcount > 0

    async def list_files(
        self, purpose: str | None, after: str | None, limit: int
    ) -> list[JsonDict]:
        where, args = ("purpose = ?", [purpose]) if purpose else ("1=1", [])
        rows = await self._run(
            lambda db: _newest_first(db, "files", "doc", where, args, after, limit)
        )
        return [_load(row[0]) for row in rows]

    async def put_batch(self, batch: JsonDict) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO batches (id, created_at, status, doc) VALUES (?, ?, ?, ?)",
                (batch["id"], batch["created_at"], batch["status"], json.dumps(batch)),
            )
        )

    async def get_batch(self, batch_id: str) -> JsonDict | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT doc, status FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
        )
        return {**_load(row[0]), "status": row[1]} if row else None

    async def update_batch(self, batch_id: str, fields: JsonDict) -> None:
        def update(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row:
                doc = {**_load(row[0]), **fields}
                db.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps(doc), batch_id))

        await self._run(update)

    async def transition(
        self, batch_id: str, to: str, allowed_from: Sequence[str], fields: JsonDict | None = None
    ) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT doc, status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if not row or row[1] not in allowed_from:
                return False
            doc = {**_load(row[0]), **(fields or {}), "status": to}
            db.execute(
                "UPDATE batches SET doc = ?, status = ? WHERE id = ?",
                (json.dumps(doc), to, batch_id),
            )
            return True

        return await self._run(update)

    async def list_batches(self, after: str | None, limit: int) -> list[JsonDict]:
        rows = await self._run(
            lambda db: _newest_first(db, "batches", "doc, status", "1=1", [], after, limit)
        )
        return [{**_load(doc), "status": status} for doc, status in rows]

    async def active_batch_ids(self) -> list[str]:
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        rows = await self._run(
            lambda db: db.execute(
                f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY created_at",
                ACTIVE_STATUSES,
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def commit_chunk(self, batch_id: str, index: int, completed: int, failed: int) -> bool:
        cursor = await self._run(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?)",
                (batch_id, index, completed, failed),
            )
        )
        return cursor.rowcount > 0

    async def chunk_done(self, batch_id: str, index: int) -> bool:
        row = await self._run(
            lambda db: db.execute(
                "SELECT 1 FROM chunks WHERE batch_id = ? AND idx = ?", (batch_id, index)
            ).fetchone()
        )
        return row is not None

    async def chunk_counts(self, batch_id: str) -> ChunkCounts:
        row = await self._run(
            lambda db: db.execute(
                "SELECT COUNT(*), COALESCE(SUM(completed), 0), COALESCE(SUM(failed), 0) "
                "FROM chunks WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
        )
        return ChunkCounts(done=row[0], completed=row[1], failed=row[2])

    async def claim_finalize(self, batch_id: str) -> bool:
        cursor = await self._run(
            lambda db: db.execute(
                "UPDATE batches SET finalize_claimed = 1 WHERE id = ? AND finalize_claimed = 0",
                (batch_id,),
            )
        )
        return cursor.rowcount > 0

    async def close(self) -> None:
        await self._run(lambda db: db.close())


def _load(doc: str) -> JsonDict:
    loaded: JsonDict = json.loads(doc)
    return loaded


def _newest_first(
    db: sqlite3.Connection,
    table: str,
    columns: str,
    where: str,
    args: list[Any],
    after: str | None,
    limit: int,
) -> list[Any]:
    """One page of ``table``'s rows (our own table and column names, never input) newest
    first, after the row whose id is ``after``: the cursor pagination of OpenAI's lists."""
    sql = f"SELECT {columns} FROM {table} WHERE {where}"
    if after:
        sql += f" AND (created_at, id) < (SELECT created_at, id FROM {table} WHERE id = ?)"
        args = [*args, after]
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    return db.execute(sql, [*args, limit]).fetchall()
