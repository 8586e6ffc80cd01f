"""Cache keys and the value encoding shared by every tier.

A key names everything that changes the vector: ``namespace:fingerprint:sha256(text)``. The
value is the raw little-endian float32 vector (1,536 bytes for 384 dimensions), which is also
what the ``base64`` encoding of the OpenAI API carries, so a hit needs no conversion.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

_WIRE_DTYPE = np.dtype("<f4")


def cache_key(namespace: str, fingerprint: str, text: str) -> str:
    """The key of ``text`` embedded by the model identified by ``fingerprint``.

    >>> cache_key("ep", "m1", "hello")[:6]
    'ep:m1:'
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"{namespace}:{fingerprint}:{digest}"


def vector_to_bytes(vector: npt.ArrayLike) -> bytes:
    """Encode a vector as little-endian float32 bytes (the cache and base64 wire format)."""
    return np.asarray(vector).astype(_WIRE_DTYPE, copy=False).tobytes()


def bytes_to_vector(data: bytes) -> npt.NDArray[np.float32]:
    """Decode bytes from :func:`vector_to_bytes`. The array is a read-only view of ``data``."""
    return np.frombuffer(data, dtype=_WIRE_DTYPE)
