"""``OUTPUT.parts/``: a dataset job's work dir, where committed chunks wait to be assembled.

Every write goes to a temporary name, is fsynced and renamed, so a run killed at any instant
leaves only whole files; a lock keeps a second run of the same job out.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import pyarrow as pa

from embedpipe.datasets.formats import Matrix, embedding_type, vectors_to_arrow
from embedpipe.errors import DatasetError


class WorkDir:
    """``OUTPUT.parts/``: the manifest, the committed parts, and a lock against a second run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: int | None = None

    def __enter__(self) -> Self:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatasetError(
                f"another `embedpipe embed` is writing {self.path.name.removesuffix('.parts')}"
            ) from None
        self._lock = fd  # released by the kernel too when the process dies, even by SIGKILL
        for stale in self.path.glob("*.tmp"):
            stale.unlink()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.manifest_path, json.dumps(manifest, indent=2).encode())

    def part_path(self, index: int) -> Path:
        return self.path / f"part-{index:09d}.arrow"

    def committed(self) -> set[int]:
        return {int(part.stem.removeprefix("part-")) for part in self.path.glob("part-*.arrow")}

    def clear_parts(self) -> None:
        for part in self.path.glob("part-*.arrow"):
            part.unlink()

    def commit(
        self, index: int, ids: pa.Array, vectors: Matrix, skipped: int, id_type: pa.DataType
    ) -> None:
        """Write chunk ``index``'s output under its final name, all or nothing."""
        schema = pa.schema(
            [("id", id_type), ("embedding", embedding_type(vectors.shape[1]))],
            metadata={"skipped": str(skipped)},
        )
        batch = pa.RecordBatch.from_arrays([ids, vectors_to_arrow(vectors)], schema=schema)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
        atomic_write(self.part_path(index), sink.getvalue().to_pybytes())

    def read_part(self, index: int) -> tuple[pa.Array, Matrix, int]:
        """(ids, vectors, skipped rows) of a committed chunk."""
        with pa.memory_map(str(self.part_path(index))) as source:
            table = pa.ipc.open_file(source).read_all()
        skipped = int((table.schema.metadata or {}).get(b"skipped", b"0"))
        embeddings = table.column("embedding").combine_chunks()
        dims = embeddings.type.list_size
        flat = embeddings.values.to_numpy(zero_copy_only=False)
        vectors: Matrix = np.asarray(flat, dtype=np.float32).reshape(-1, dims)
        return table.column("id").combine_chunks(), vectors, skipped

    def part_counts(self, index: int) -> tuple[int, int]:
        """(rows, skipped) of a committed chunk, from its footer alone."""
        with pa.memory_map(str(self.part_path(index))) as source:
            reader = pa.ipc.open_file(source)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            skipped = int((reader.schema.metadata or {}).get(b"skipped", b"0"))
        return rows, skipped


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_identity(path: Path) -> dict[str, Any]:
    """Enough to tell that a file changed since a job recorded it."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` all or nothing (temporary name, fsync, rename)."""
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
