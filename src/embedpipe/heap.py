"""Hand the C heap's free memory back to the system once a process has loaded its models.

Loading parses configs, builds graphs and runs the warm-up: much of what that allocated is
free again afterwards, but glibc keeps freed pages in its heap until told otherwise, so they
stay resident for the life of the process. ``malloc_trim(0)`` returns them (about 10 MiB in
the slim image). Elsewhere (musl, macOS) there is nothing to call, and nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_heap() -> bool:
    """glibc's ``malloc_trim(0)``: True when it ran (and released something or not)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
