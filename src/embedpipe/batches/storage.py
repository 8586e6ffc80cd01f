"""Files on the data dir, which the API and every worker share (a volume in compose).

Every write goes to a temporary name and is renamed into place, so a reader never sees half a
file and a retried writer never leaves two.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from embedpipe.batches.objects import is_batch_id, is_file_id
from embedpipe.errors import StorageFull, TooLarge


class Storage:
    def __init__(self, data_dir: Path) -> None:
        self.files_dir = data_dir / "files"
        self.batches_dir = data_dir / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)

    def file_path(self, file_id: str) -> Path:
        if not is_file_id(file_id):  # never a path built from unchecked input
            raise ValueError(f"not a file id: {file_id!r}")
        return self.files_dir / file_id

    def batch_dir(self, batch_id: str) -> Path:
        if not is_batch_id(batch_id):
            raise ValueError(f"not a batch id: {batch_id!r}")
        return self.batches_dir / batch_id

    def save_upload(self, file_id: str, source: BinaryIO, max_bytes: int) -> int:
        """Copy an upload to disk (blocking: call it in a thread); TooLarge past
        ``max_bytes``, and then nothing is left behind."""
        target = self.file_path(file_id)
        handle, temp = tempfile.mkstemp(dir=self.files_dir, prefix=".upload-")
        size = 0
        try:
            with os.fdopen(handle, "wb") as out:
                while block := source.read(1 << 20):
                    size += len(block)
                    if size > max_bytes:
                        raise TooLarge(f"The file is larger than {max_bytes} bytes.", param="file")
                    out.write(block)
            os.replace(temp, target)
        except BaseException as exc:
            Path(temp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("There is no room left for files; try again later.") from exc
            raise
        return size

    def start_upload(self, max_bytes: int) -> UploadSpool:
        """A file to stream an upload into, under a temporary name in the files directory
        (blocking: call it in a thread)."""
        return UploadSpool(self, max_bytes)

    def delete_file(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)

    def remove_batch_dir(self, batch_id: str) -> None:
        """Remove a batch's working files (chunks in and out): blocking."""
        shutil.rmtree(self.batch_dir(batch_id), ignore_errors=True)


class UploadSpool:
    """An upload being received: written (blocking: in a thread) under a temporary name in
    the files directory, then renamed into place by :meth:`commit` or removed by
    :meth:`discard`. :meth:`count` refuses the upload past ``max_bytes`` before its bytes
    are written, so the limit holds while streaming."""

    def __init__(self, storage: Storage, max_bytes: int) -> None:
        self._storage = storage
        self.max_bytes = max_bytes
        self.size = 0
        try:
            handle, temp = tempfile.mkstemp(dir=storage.files_dir, prefix=".upload-")
        except OSError as exc:
            _raise_if_full(exc)
            raise
        self._temp = Path(temp)
        self._out: BinaryIO | None = os.fdopen(handle, "wb")

    def count(self, size: int) -> None:
        """Account for ``size`` more bytes of the upload; TooLarge past ``max_bytes``."""
        self.size += size
        if self.size > self.max_bytes:
            raise TooLarge(f"The file is larger than {self.max_bytes} bytes.", param="file")

    def write(self, block: bytes) -> None:
        """Append ``block`` (already counted): blocking."""
        if self._out is None:
            raise ValueError("the upload is already committed or discarded")
        try:
            self._out.write(block)
        except OSError as exc:
            _raise_if_full(exc)
            raise

    def commit(self, file_id: str) -> int:
        """Rename the upload into place as ``file_id``; its size. Blocking."""
        target = self._storage.file_path(file_id)
        out, self._out = self._out, None
        if out is None:
            raise ValueError("the upload is already committed or discarded")
        try:
            out.close()
            os.replace(self._temp, target)
        except BaseException as exc:
            self._temp.unlink(missing_ok=True)
            _raise_if_full(exc)
            raise
        return self.size

    def discard(self) -> None:
        """Remove what was written (nothing once committed): quick, safe to call twice."""
        out, self._out = self._out, None
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()
            self._temp.unlink(missing_ok=True)


def _raise_if_full(exc: BaseException) -> None:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull("There is no room left for files; try again later.") from exc


def write_atomically(path: Path, lines: Iterable[bytes], make_parents: bool = True) -> None:
    """Write ``lines`` (each ending in a newline) to ``path`` all at once or not at all."""
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(handle, "wb") as out:
            for line in lines:
                out.write(line)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def concatenate_atomically(path: Path, parts: Iterable[Path]) -> int:
    """Join ``parts`` (the missing ones count as empty) into ``path``; its size in bytes."""

    def lines() -> Iterable[bytes]:
        for part in parts:
            if part.exists():
                with part.open("rb") as source:
                    yield from source

    write_atomically(path, lines())
    return path.stat().st_size
