"""L2 on disk: SQLite under the data dir, so the embedded mode keeps its cache across restarts.

sqlite3 blocks, so the tier owns ONE worker thread that holds the only connection and runs
every statement; the event loop only awaits it. WAL lets the processes of ``serve --workers
N`` share the file (readers never block; writers wait ``busy_timeout``).

The table is a plain rowid table on purpose: ``id`` grows with every write, so the table's
B-tree is in write order and evicting the lowest ids frees whole pages (a WITHOUT ROWID table
keyed by a random hash would scatter the deletes, and ~1.5 KB rows are too big for it anyway).
A hit on an entry untouched for ``touch_after`` seconds rewrites it at the end, which makes
the eviction order least-recently-used at that granularity without a write per read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self, TypeVar

from embedpipe.cache.base import TierStats
from embedpipe.metrics import CACHE_ERRORS
from embedpipe.private_files import private_dir, private_file, sqlite_files

logger = logging.getLogger("embedpipe.cache")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache (
    id INTEGER PRIMARY KEY,      -- write order: the eviction order
    key TEXT NOT NULL UNIQUE,
    value BLOB NOT NULL,
    written REAL NOT NULL,       -- unix time of the write, for the TTL
    touched REAL NOT NULL        -- unix time of the write or the last refresh by a hit
);
CREATE INDEX IF NOT EXISTS cache_written ON cache (written);
"""
_UPSERT = "INSERT OR REPLACE INTO cache (key, value, written, touched) VALUES (?, ?, ?, ?)"
_CHUNK = 500  # bound parameters per IN (...), under every SQLite build's limit
_BUSY_TIMEOUT_MS = 500  # another process writing; beyond it, count an error and move on
_ROW_OVERHEAD = 64  # record header, id and timestamps, key index entry besides the key
_EXPIRE_BATCH = 10_000
_MAX_EVICT_ROUNDS = 8


class SqliteTier:
    """Cache tier ``l2`` in a SQLite file. Never raises from get/set.

    ``max_bytes=0``: unbounded. ``ttl_seconds=0``: entries never expire.

    >>> tier = await SqliteTier(data_dir / "cache.sqlite3", 2 << 30, 86400).open()
    >>> await tier.set_many({"ep:fp:abc": b"..."})
    >>> await tier.close()
    """

    name = "l2"

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        ttl_seconds: int,
        *,
        clock: Callable[[], float] = time.time,
        touch_after: float = 3600.0,
        maintain_every: int = 1000,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._touch_after = touch_after
        self._maintain_every = maintain_every
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on the worker thread only
        self._writes_since_maintenance = 0
        self._avg_row = 2048.0
        self._healthy = False
        self._errors = CACHE_ERRORS.labels(tier=self.name)
        self.hits = 0
        self.misses = 0
        self.errors = 0

    async def open(self) -> Self:
        """Start the worker thread and open (or create) the database.

        A file that cannot be opened (permissions, corruption) is logged and the tier stays
        unhealthy, answering misses: a broken cache must not stop the service.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-sqlite")
        try:
            await self._run(self._open_sync)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("cache tier l2: cannot open %s (%s); running without it", self.path, exc)
            self._count_error()
        else:
            self._healthy = True
        return self

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._executor is None:
            raise RuntimeError("SqliteTier is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.OperationalError("cache database is not open")
        return self._conn

    # --- worker thread -------------------------------------------------------------------

    def _open_sync(self) -> None:
        private_dir(self.path.parent)
        # SQLite gives its -wal and -shm files the database's mode: 0600 here, and existing
        # ones (from before) are tightened too.
        private_file(self.path)
        for companion in sqlite_files(self.path)[1:]:
            if companion.exists():
                private_file(companion)
        conn = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # a crash may lose the last writes: fine
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._maintain_sync(self._clock())

    def _get_sync(self, keys: Sequence[str], now: float) -> list[bytes | None]:
        db = self._db()
        rows: dict[str, tuple[bytes, float, float]] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            sql = (
                "SELECT key, value, written, touched FROM cache "
                f"WHERE key IN ({','.join('?' * len(chunk))})"
            )
            for key, value, written, touched in db.execute(sql, chunk):
                rows[key] = (value, written, touched)
        expired_before = now - self.ttl_seconds if self.ttl_seconds else -math.inf
        out: list[bytes | None] = []
        refresh: dict[str, tuple[bytes, float]] = {}
        for key in keys:
            row = rows.get(key)
            if row is None or row[1] <= expired_before:
                out.append(None)
                continue
            out.append(row[0])
            if now - row[2] >= self._touch_after:
                refresh[key] = (row[0], row[1])
        if refresh:
            self._refresh_sync(refresh, now)
        return out

    def _refresh_sync(self, rows: Mapping[str, tuple[bytes, float]], now: float) -> None:
        # Rewriting moves the row to the end of the eviction order; it keeps its TTL.
        try:
            self._write_sync([(k, v, written, now) for k, (v, written) in rows.items()])
        except sqlite3.OperationalError as exc:  # busy: the read itself succeeded
            logger.debug("cache tier l2: refresh skipped: %s", exc)

    def _write_sync(self, rows: list[tuple[str, bytes, float, float]]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_UPSERT, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _set_sync(self, items: Mapping[str, bytes], now: float) -> None:
        rows = [(k, v, now, now) for k, v in items.items()]
        self._write_sync(rows)
        size = sum(len(k) + len(v) for k, v, _, _ in rows) / len(rows) + _ROW_OVERHEAD
        self._avg_row = 0.9 * self._avg_row + 0.1 * size
        self._writes_since_maintenance += len(rows)
        if self._writes_since_maintenance >= self._maintain_every:
            self._maintain_sync(now)

    def _used_bytes_sync(self) -> int:
        # O(1): pages in use, from the header. The file itself keeps freed pages for reuse.
        db = self._db()
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _maintain_sync(self, now: float) -> None:
        """Drop expired entries, then the oldest ones while over ``max_bytes``. Best effort:
        when another process holds the write lock, the next round will do it."""
        self._writes_since_maintenance = 0
        try:
            self._evict_sync(now)
        except sqlite3.OperationalError as exc:
            logger.debug("cache tier l2: maintenance skipped: %s", exc)

    def _evict_sync(self, now: float) -> None:
        db = self._db()
        if self.ttl_seconds:
            for _ in range(_MAX_EVICT_ROUNDS):
                cur = db.execute(
                    "DELETE FROM cache WHERE id IN "
                    "(SELECT id FROM cache WHERE written <= ? LIMIT ?)",
                    (now - self.ttl_seconds, _EXPIRE_BATCH),
                )
                if cur.rowcount < _EXPIRE_BATCH:
                    break
        if not self.max_bytes:
            return
        used = self._used_bytes_sync()
        if used <= self.max_bytes:
            return
        # Evict a little below the bound so that the next writes do not evict at once again.
        target = self.max_bytes * 0.95
        for _ in range(_MAX_EVICT_ROUNDS):
            count = max(16, math.ceil((used - target) / self._avg_row))
            cur = db.execute(
                "DELETE FROM cache WHERE id IN (SELECT id FROM cache ORDER BY id LIMIT ?)",
                (count,),
            )
            used = self._used_bytes_sync()
            if cur.rowcount == 0 or used <= target:
                return

    def _stats_sync(self) -> tuple[int, int]:
        entries = self._db().execute("SELECT count(*) FROM cache").fetchone()[0]
        return int(entries), self._used_bytes_sync()

    def _clear_sync(self) -> None:
        db = self._db()
        db.execute("DELETE FROM cache")
        try:  # give the disk space back; fails harmlessly while another process reads
            db.execute("VACUUM")
        except sqlite3.OperationalError as exc:
            logger.debug("cache tier l2: vacuum after clear skipped: %s", exc)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- the CacheTier protocol ------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            values = await self._run(self._get_sync, list(keys), self._clock())
        except Exception as exc:
            self._failed("get", exc)
            self.misses += len(keys)
            return [None] * len(keys)
        self._healthy = True
        found = sum(v is not None for v in values)
        self.hits += found
        self.misses += len(keys) - found
        return values

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return
        try:
            await self._run(self._set_sync, dict(items), self._clock())
        except Exception as exc:
            self._failed("set", exc)
            return
        self._healthy = True

    async def stats(self) -> TierStats:
        entries: int | None = None
        used: int | None = None
        try:
            entries, used = await self._run(self._stats_sync)
        except Exception as exc:
            logger.debug("cache tier l2: stats failed: %r", exc)
        return TierStats(
            name=self.name,
            hits=self.hits,
            misses=self.misses,
            errors=self.errors,
            entries=entries,
            bytes=used,
            healthy=self._healthy and entries is not None,
        )

    async def clear(self) -> None:
        """Delete every entry. Unlike get/set this raises on failure (an operator action)."""
        await self._run(self._clear_sync)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=True)
            self._healthy = False

    def _count_error(self) -> None:
        self.errors += 1
        self._errors.inc()

    def _failed(self, op: str, exc: Exception) -> None:
        self._count_error()
        was_healthy, self._healthy = self._healthy, False
        if not isinstance(exc, sqlite3.Error | OSError):  # a bug rather than a disk problem
            logger.warning("cache tier l2 (sqlite): unexpected error in %s", op, exc_info=exc)
        elif was_healthy:  # one line per outage, not one per request
            logger.warning("cache tier l2 (sqlite): %s failed: %s", op, exc)
        else:
            logger.debug("cache tier l2 (sqlite): %s failed: %s", op, exc)
