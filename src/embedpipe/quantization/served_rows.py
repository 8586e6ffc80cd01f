"""Compact rows served recently, by the float32 rows they were made from.

A cache hit serves the same float32 row again and again; making its int8 or binary form
anew each time costs more than the hit itself. Each of those numpy calls is cheap on a warm
CPU cache (~0.5 µs), but between two requests the server's other work evicts numpy's code
and data, and then the int8 pipeline's seven calls took ~29 µs a request (binary's ~17 µs)
against float32's nothing. The rows are a pure function of the float32 bytes, the type and
the model's calibration, so the answer made once is served as long as it is remembered.

Meant for one event loop (no lock): the service's requests use it from there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import numpy as np
import numpy.typing as npt

from embedpipe.quantization.calibration import Calibration

# The types worth remembering: float32 is served as it is, and float16 is one cast.
REMEMBERED_TYPES = frozenset({"int8", "uint8", "binary", "ubinary"})
# Requests of a few texts repeat whole (a query, a short list); larger batches rarely do, and
# remembering them would push the small ones out.
MAX_ROWS = 8
DEFAULT_MAX_BYTES = 8 * 1024 * 1024

_Key = tuple[str, str, tuple[int, ...], str, bytes]


class ServedRows:
    """A bounded least-recently-used map from (type, model calibration, float32 rows) to the
    compact rows (read-only arrays) made of them."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._rows: OrderedDict[_Key, npt.NDArray[Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def size_bytes(self) -> int:
        """Keys and rows held, in bytes (what ``max_bytes`` bounds)."""
        return self._bytes

    def served(
        self,
        vectors: npt.NDArray[np.float32],
        embedding_type: str,
        calibration: Calibration | None,
        make: Callable[[], npt.NDArray[Any]],
    ) -> npt.NDArray[Any]:
        """The rows ``make()`` gives for ``vectors`` as ``embedding_type``: remembered ones
        when these vectors were served so before (read-only either way, when remembered)."""
        if embedding_type not in REMEMBERED_TYPES or len(vectors) > MAX_ROWS:
            return make()
        key = _key(vectors, embedding_type, calibration)
        rows = self._rows.get(key)
        if rows is not None:
            with suppress(KeyError):  # pushed out meanwhile by another thread's request
                self._rows.move_to_end(key)
            return rows
        rows = np.ascontiguousarray(make())
        size = len(key[-1]) + rows.nbytes
        if size > self._max_bytes:
            return rows
        rows.flags.writeable = False
        self._rows[key] = rows
        self._bytes += size
        while self._bytes > self._max_bytes:
            old_key, old_rows = self._rows.popitem(last=False)
            self._bytes -= len(old_key[-1]) + old_rows.nbytes
        return rows


def _key(
    vectors: npt.NDArray[np.float32], embedding_type: str, calibration: Calibration | None
) -> _Key:
    # Shape and dtype are in the key: the same bytes are 2 rows of 384 or 1 of 768.
    fingerprint = calibration.fingerprint if calibration is not None else ""
    return embedding_type, fingerprint, vectors.shape, vectors.dtype.str, vectors.tobytes()
