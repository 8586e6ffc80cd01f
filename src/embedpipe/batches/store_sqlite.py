"""The embedded job store: SQLite under the data dir (one server process owns it).

The database holds every batch's metadata and errors, so it is the owner's alone (0600, as
are the ``-wal`` and ``-shm`` files SQLite creates with the database's mode). Files and
batches are indexed by owner: listing one key's objects never walks another's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from embedpipe.batches.objects import ACTIVE_STATUSES, JsonDict
from embedpipe.batches.store import ChunkCounts, Usage
from embedpipe.errors import StorageFull

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
CREATE TABLE IF NOT EXISTS runs (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, started INTEGER NOT NULL,
    PRIMARY KEY (batch_id, idx));
"""

# Owner ('' = made with auth off) and size as columns, added to a database of an older version
# and filled from the documents.
_COLUMNS = {
    "files": (
        ("owner", "TEXT NOT NULL DEFAULT ''", "COALESCE(json_extract(doc, '$._owner'), '')"),
        ("bytes", "INTEGER NOT NULL DEFAULT 0", "COALESCE(json_extract(doc, '$.bytes'), 0)"),
        ("expires_at", "INTEGER", "json_extract(doc, '$.expires_at')"),
    ),
    "batches": (
        ("owner", "TEXT NOT NULL DEFAULT ''", "COALESCE(json_extract(doc, '$._owner'), '')"),
    ),
}
_INDEXES = """
CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner, created_at, id);
CREATE INDEX IF NOT EXISTS files_by_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner, created_at, id);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status);
"""
_PRIVATE = 0o600


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it (whatever the umask), and made so if older.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, _PRIVATE))
        os.chmod(path, _PRIVATE)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        _add_columns(self._db)
        self._db.executescript(_INDEXES)
        for suffix in ("-wal", "-shm"):  # left by an older version with the umask's mode
            extra = path.with_name(path.name + suffix)
            if extra.exists():
                os.chmod(extra, _PRIVATE)
        self._lock = threading.Lock()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                try:
                    return work(self._db)
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                        raise StorageFull("The job store is full; try again later.") from exc
                    raise

        return await asyncio.to_thread(locked)

    async def put_file(self, file: JsonDict) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO files "
                "(id, created_at, purpose, doc, owner, bytes, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    file["id"],
                    file["created_at"],
                    file["purpose"],
                    json.dumps(file),
                    file.get("_owner") or "",
                    file["bytes"],
                    file.get("expires_at"),
                ),
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
        self, purpose: str | None, after: str | None, limit: int, owner: str | None = None
    ) -> list[JsonDict]:
        where, args = _owned(owner)
        if purpose:
            where, args = f"{where} AND purpose = ?", [*args, purpose]
        rows = await self._run(
            lambda db: _newest_first(db, "files", "doc", where, args, after, limit)
        )
        return [_load(row[0]) for row in rows]

    async def expired_files(self, at: int, limit: int) -> list[str]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
                (at, limit),
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def put_batch(self, batch: JsonDict) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO batches (id, created_at, status, doc, owner) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    batch["id"],
                    batch["created_at"],
                    batch["status"],
                    json.dumps(batch),
                    batch.get("_owner") or "",
                ),
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

    async def list_batches(
        self, after: str | None, limit: int, owner: str | None = None
    ) -> list[JsonDict]:
        where, args = _owned(owner)
        rows = await self._run(
            lambda db: _newest_first(db, "batches", "doc, status", where, args, after, limit)
        )
        return [{**_load(doc), "status": status} for doc, status in rows]

    async def usage(self, owner: str | None) -> Usage:
        marks = ",".join("?" * len(ACTIVE_STATUSES))

        def count(db: sqlite3.Connection) -> Usage:
            files, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files WHERE owner = ?",
                (owner or "",),
            ).fetchone()
            (active,) = db.execute(
                f"SELECT COUNT(*) FROM batches WHERE owner = ? AND status IN ({marks})",
                (owner or "", *ACTIVE_STATUSES),
            ).fetchone()
            return Usage(files=files, bytes=size, active_batches=active)

        return await self._run(count)

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

    async def begin_run(self, batch_id: str, index: int) -> int:
        row = await self._run(
            lambda db: db.execute(
                "INSERT INTO runs VALUES (?, ?, 1) ON CONFLICT (batch_id, idx) "
                "DO UPDATE SET started = started + 1 RETURNING started",
                (batch_id, index),
            ).fetchone()
        )
        return int(row[0]) - 1

    async def end_run(self, batch_id: str, index: int) -> None:
        await self._run(
            lambda db: db.execute(
                "DELETE FROM runs WHERE batch_id = ? AND idx = ?", (batch_id, index)
            )
        )

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


def _add_columns(db: sqlite3.Connection) -> None:
    for table, columns in _COLUMNS.items():
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, declaration, fill in columns:
            if name not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                db.execute(f"UPDATE {table} SET {name} = {fill}")


def _owned(owner: str | None) -> tuple[str, list[Any]]:
    """The WHERE clause of one owner's rows (None: every row, auth is off)."""
    return ("owner = ?", [owner]) if owner is not None else ("1=1", [])


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
