"""Lossless packing of float32 unit vectors for the shared (L2) tier: 31 bits per component.

A component of a unit vector has magnitude below 2, so bit 30 of its float32 (the top bit of
the exponent) is always 0. Dropping it stores a 384-d vector in 1,489 bytes instead of 1,536,
which moves a Redis value from jemalloc's 1,792-byte size class into the 1,536-byte one: about
250 bytes less per entry (measured by ``make bench-memory``), with the same float32 bits back.

Layout: the low three bytes of every component (3·d bytes), then the seven remaining bits of
each top byte (sign and six exponent bits), eight of them to seven bytes (7·d/8 bytes), then
a trailer that makes the length odd and ends in a marker byte. Raw float32 and float16 values
always have an even length, so the two formats never mix up, and entries written before
packing existed read back as they are. Only values of whole groups of 8 float32 components
(16 or more) with bit 30 clear are packed; anything else (a score, a vector an upstream did
not normalise) is stored raw. The packing is bitwise, so a float16 store (whose 16-bit halves
of a unit vector have a zero top exponent bit too) shrinks the same way. Values given to the
tiered cache must have an even length, as vectors and scores do.

Values are packed and unpacked many at a time (one numpy pass per length), since a request's
L2 round trip carries up to thousands of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

_MARKER = 0xA5
_BIT_30 = np.uint32(0x40000000)
# A float32's top byte (sign, then 7 exponent bits of which the first is 0 here) to 7 bits
# (the sign moves over the zero bit) and back.
_TO_SEVEN = np.array([((b & 0x80) >> 1) | (b & 0x3F) for b in range(256)], dtype=np.uint8)
_FROM_SEVEN = np.array([((b & 0x40) << 1) | (b & 0x3F) for b in range(256)], dtype=np.uint8)
# Eight 7-bit fields side by side in the low 56 bits of a little-endian uint64.
_SHIFTS = np.arange(0, 56, 7, dtype=np.uint64)
_PLACES = np.uint64(1) << _SHIFTS
_SEVEN_BITS = np.uint64(0x7F)


def _trailer(dimensions: int) -> bytes:
    return bytes([_MARKER]) if (31 * dimensions // 8) % 2 == 0 else bytes([0, _MARKER])


def _packed_rows(raw: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Rows of float32 bytes (bit 30 clear) → rows of packed bytes, without the trailer."""
    rows = raw.shape[0]
    components = raw.reshape(rows, -1, 4)
    seven = _TO_SEVEN[components[:, :, 3]].reshape(rows, -1, 8).astype(np.uint64)
    fields = (seven @ _PLACES).astype("<u8")  # disjoint bits: the sum is the bitwise or
    high = fields.view(np.uint8).reshape(rows, -1, 8)[:, :, :7].reshape(rows, -1)
    return np.concatenate([components[:, :, :3].reshape(rows, -1), high], axis=1)


def _unpacked_rows(body: npt.NDArray[np.uint8], dimensions: int) -> npt.NDArray[np.uint8]:
    """Rows of packed bytes (no trailer) → rows of little-endian float32 bytes."""
    rows = body.shape[0]
    groups = np.zeros((rows, dimensions // 8, 8), dtype=np.uint8)
    groups[:, :, :7] = body[:, 3 * dimensions :].reshape(rows, -1, 7)
    seven = ((groups.view("<u8") >> _SHIFTS) & _SEVEN_BITS).astype(np.uint8)
    out = np.empty((rows, dimensions, 4), dtype=np.uint8)
    out[:, :, :3] = body[:, : 3 * dimensions].reshape(rows, dimensions, 3)
    out[:, :, 3] = _FROM_SEVEN[seven.reshape(rows, dimensions)]
    return out.reshape(rows, -1)


def pack_many(values: Sequence[bytes]) -> list[bytes]:
    """Each value in the packed layout, or as it is when it cannot be packed losslessly."""
    out = list(values)
    by_length: dict[int, list[int]] = {}
    for position, value in enumerate(values):
        # From 16 components on: below that the trailer eats the saving.
        if len(value) >= 64 and len(value) % 32 == 0:
            by_length.setdefault(len(value), []).append(position)
    for length, positions in by_length.items():
        raw = np.frombuffer(b"".join(values[p] for p in positions), dtype=np.uint8)
        raw = raw.reshape(len(positions), length)
        clear = ~(raw.view("<u4") & _BIT_30).any(axis=1)
        if not clear.any():
            continue
        trailer = _trailer(length // 4)
        packed = _packed_rows(raw[clear])
        for position, row in zip(np.asarray(positions)[clear], packed, strict=True):
            out[position] = row.tobytes() + trailer
    return out


def packed_items(items: Mapping[str, bytes]) -> dict[str, bytes]:
    """``items`` (key to L1's value) as L2 stores them: the same keys, values packed."""
    return dict(zip(items, pack_many(list(items.values())), strict=True))


def unpack_many(values: Sequence[bytes | None]) -> list[bytes | None]:
    """The float32 bytes of each packed value; any other value (or None) as it is."""
    out = list(values)
    by_dimensions: dict[int, list[int]] = {}
    for position, value in enumerate(values):
        if value is not None and len(value) % 2 and value[-1] == _MARKER:
            dimensions = 8 * (len(value) // 31)
            if dimensions and len(value) == 31 * dimensions // 8 + len(_trailer(dimensions)):
                by_dimensions.setdefault(dimensions, []).append(position)
    for dimensions, positions in by_dimensions.items():
        size = 31 * dimensions // 8
        body = np.frombuffer(b"".join(values[p][:size] for p in positions), dtype=np.uint8)  # type: ignore[index]
        rows = _unpacked_rows(body.reshape(len(positions), size), dimensions)
        for position, row in zip(positions, rows, strict=True):
            out[position] = row.tobytes()
    return out
