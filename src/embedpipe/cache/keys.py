"""Cache keys and the value encoding shared by every tier.

A key names everything that changes the vector: ``namespace:fingerprint:sha256(text)``. The
value is the raw little-endian float32 vector (1,536 bytes for 384 dimensions), which is also
what the ``base64`` encoding of the OpenAI API carries, so a hit needs no conversion.

``store_dtype = "float16"`` halves every entry (768 bytes for 384 dimensions) at a cosine of
~0.99999 to the float32 vector. Its entries live under their own fingerprint (``<fp>-f16``),
so float32 and float16 values never mix, and a server switched back to float32 finds its old
entries where it left them.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import numpy.typing as npt

StoreDtype = Literal["float32", "float16"]

_WIRE_DTYPE = np.dtype("<f4")
_STORE_DTYPES: dict[str, np.dtype[np.floating]] = {
    "float32": _WIRE_DTYPE,
    "float16": np.dtype("<f2"),
}
# The float32 format keeps the bare model fingerprint: keys written before there was a choice
# stay valid.
_FINGERPRINT_SUFFIX = {"float32": "", "float16": "-f16"}


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


class VectorCodec:
    """How vectors are stored in the cache: float32 (exact) or float16 (half the bytes).

    >>> codec = VectorCodec("float16")
    >>> codec.fingerprint("abc")
    'abc-f16'
    >>> len(codec.encode(np.ones(384, dtype=np.float32)))
    768
    """

    def __init__(self, dtype: StoreDtype = "float32") -> None:
        if dtype not in _STORE_DTYPES:
            raise ValueError(f"unknown store dtype {dtype!r}")
        self.dtype = dtype
        self._dtype = _STORE_DTYPES[dtype]
        self._suffix = _FINGERPRINT_SUFFIX[dtype]

    @property
    def exact(self) -> bool:
        """True when a stored vector decodes to exactly the computed one (float32)."""
        return self._dtype == _WIRE_DTYPE

    def fingerprint(self, model_fingerprint: str) -> str:
        """The fingerprint that goes into keys: the model's, plus the stored format."""
        return model_fingerprint + self._suffix

    def encode(self, vector: npt.ArrayLike) -> bytes:
        return np.asarray(vector).astype(self._dtype, copy=False).tobytes()

    def decode(self, data: bytes) -> npt.NDArray[np.float32]:
        """A float32 vector (read-only when stored as float32: a view of ``data``)."""
        if self.exact:
            return np.frombuffer(data, dtype=_WIRE_DTYPE)
        return np.frombuffer(data, dtype=self._dtype).astype(np.float32)

    def round_trip(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``vectors`` as they will come back from the cache: a computed answer and every
        later hit then agree to the bit."""
        if self.exact:
            return vectors
        return vectors.astype(self._dtype).astype(np.float32)
