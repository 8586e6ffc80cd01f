"""The compact rows served lately (``ServedRows``): the same bytes as quantising anew, and
bounded."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from embedpipe.quantization import Calibration, ServedRows, quantize, served_as
from embedpipe.quantization.served_rows import MAX_ROWS


def _unit_rows(count: int, dimensions: int, seed: int) -> npt.NDArray[np.float32]:
    rows = np.random.default_rng(seed).standard_normal((count, dimensions)).astype(np.float32)
    normalized: npt.NDArray[np.float32] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normalized


class CountingQuantize:
    def __init__(
        self, vectors: npt.NDArray[np.float32], kind: str, calibration: Calibration | None = None
    ):
        self.calls = 0
        self._args = vectors, kind, calibration

    def __call__(self) -> npt.NDArray[np.generic]:
        self.calls += 1
        return quantize(*self._args)  # type: ignore[arg-type]


CALIBRATION = Calibration("model-a", _unit_rows(256, 64, seed=1))


@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
def test_a_row_served_again_is_not_quantised_again_and_has_the_same_bytes(kind: str) -> None:
    remembered = ServedRows()
    vectors = _unit_rows(1, 64, seed=2)
    make = CountingQuantize(vectors, kind, CALIBRATION)
    first = remembered.served(vectors, kind, CALIBRATION, make)
    # A new array with the same values, as a cache hit gives.
    again = remembered.served(vectors.copy(), kind, CALIBRATION, make)
    assert make.calls == 1
    want = quantize(vectors, kind, CALIBRATION)  # type: ignore[arg-type]
    assert again.dtype == want.dtype and again.tobytes() == want.tobytes() == first.tobytes()
    # Shared between requests: nobody may change them in place.
    assert not again.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        again[0, 0] = 0


def test_the_type_the_model_and_the_shape_each_tell_rows_apart() -> None:
    remembered = ServedRows()
    vectors = _unit_rows(2, 64, seed=3)
    other_model = Calibration("model-b", _unit_rows(256, 64, seed=4))
    answers = [
        remembered.served(
            vectors, "int8", CALIBRATION, lambda: quantize(vectors, "int8", CALIBRATION)
        ),
        remembered.served(
            vectors, "uint8", CALIBRATION, lambda: quantize(vectors, "uint8", CALIBRATION)
        ),
        remembered.served(
            vectors, "int8", other_model, lambda: quantize(vectors, "int8", other_model)
        ),
    ]
    # The same bytes as one row of 128: another key, so the maker runs.
    wide = vectors.reshape(1, 128)
    wide_calibration = Calibration("model-a", _unit_rows(256, 128, seed=1))
    made = []

    def make_wide() -> npt.NDArray[np.generic]:
        made.append(1)
        return quantize(wide, "int8", wide_calibration)

    remembered.served(wide, "int8", wide_calibration, make_wide)
    assert made == [1]
    assert len(remembered) == 4
    assert answers[0].tobytes() == quantize(vectors, "int8", CALIBRATION).tobytes()
    assert answers[1].tobytes() == quantize(vectors, "uint8", CALIBRATION).tobytes()
    assert answers[2].tobytes() == quantize(vectors, "int8", other_model).tobytes()


def test_float_types_and_large_requests_are_never_remembered() -> None:
    remembered = ServedRows()
    one = _unit_rows(1, 64, seed=5)
    many = _unit_rows(MAX_ROWS + 1, 64, seed=6)
    for kind in ("float32", "float16"):
        remembered.served(one, kind, None, CountingQuantize(one, kind))
    remembered.served(many, "binary", None, lambda: quantize(many, "binary"))
    assert len(remembered) == 0


def test_the_oldest_rows_go_first_when_the_bytes_run_out() -> None:
    rows = [_unit_rows(1, 64, seed=10 + i) for i in range(5)]
    # Room for 3 entries: each is a 256-byte key and 8 bytes of packed bits.
    remembered = ServedRows(max_bytes=3 * (64 * 4 + 8))
    for vectors in rows[:3]:
        remembered.served(vectors, "ubinary", None, CountingQuantize(vectors, "ubinary"))
    # Serving the first again makes it the newest: the second is the one pushed out next.
    remembered.served(rows[0], "ubinary", None, lambda: pytest.fail("remembered"))
    remembered.served(rows[3], "ubinary", None, lambda: quantize(rows[3], "ubinary"))
    assert len(remembered) == 3 and remembered.size_bytes <= 3 * (64 * 4 + 8)
    remembered.served(rows[0], "ubinary", None, lambda: pytest.fail("remembered"))
    make = CountingQuantize(rows[1], "ubinary")
    remembered.served(rows[1], "ubinary", None, make)
    assert make.calls == 1


def test_served_as_counts_every_row_served_remembered_or_not() -> None:
    from embedpipe import metrics

    remembered = ServedRows()
    vectors = _unit_rows(1, 64, seed=20)
    counter = metrics.EMBEDDING_OUTPUTS.labels(model="m-served-rows", type="int8")
    before = counter._value.get()
    for _ in range(3):
        served_as("m-served-rows", vectors, "int8", CALIBRATION, remembered)
    assert counter._value.get() == before + 3
    assert len(remembered) == 1
