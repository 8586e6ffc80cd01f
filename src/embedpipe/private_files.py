"""Files only this service's user may read: the data dir (0700) and what it holds (0600).

The cache holds vectors of tenants' texts (enough to test a guess of a text), the batch store
their inputs and outputs: no other local user has any business reading them. Modes are set
explicitly, whatever the umask, on creation and on every start (an older install made them
0755 and 0644).
"""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """``path`` created if need be (parents too) and made 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """``path`` created empty if absent, and made 0600 (its folder must exist)."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def sqlite_files(database: Path) -> list[Path]:
    """A SQLite database and the files its WAL mode keeps beside it."""
    return [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
