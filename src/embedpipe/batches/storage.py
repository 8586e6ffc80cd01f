"""Files on the data dir, which the API and every worker share (a volume in compose).

Every write goes to a temporary name and is renamed into place, so a reader never sees half a
file and a retried writer never leaves two.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from embedpipe.batches.objects import is_batch_id, is_file_id
from embedpipe.errors import TooLarge


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
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return size

    def delete_file(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)


def write_atomically(path: Path, lines: Iterable[bytes]) -> None:
    """Write ``lines`` (each ending in a newline) to ``path`` all at once or not at all."""
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
