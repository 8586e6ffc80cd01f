from __future__ import annotations

import base64

import numpy as np
import pytest

from embedpipe.errors import InvalidInput
from embedpipe.vectors import check_dimensions, to_base64, truncate


def test_base64_is_little_endian_float32_as_the_openai_sdk_decodes_it() -> None:
    vector = np.array([0.5, -1.25, 3.0e-8], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(to_base64(vector)), dtype="float32")
    np.testing.assert_array_equal(decoded, vector)


def test_truncate_keeps_the_prefix_direction_at_unit_length() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 16)).astype(np.float32)
    short = truncate(vectors, 4)
    assert short.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-6)
    cosine = (short * vectors[:, :4]).sum(axis=1) / np.linalg.norm(vectors[:, :4], axis=1)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)
    assert truncate(vectors, None) is vectors


@pytest.mark.parametrize("dimensions", [0, -3, 17])
def test_dimensions_out_of_range_are_rejected(dimensions: int) -> None:
    with pytest.raises(InvalidInput) as error:
        check_dimensions(dimensions, 16)
    assert error.value.param == "dimensions"


def test_full_size_means_unchanged() -> None:
    assert check_dimensions(16, 16) is None
    assert check_dimensions(None, 16) is None
    assert check_dimensions(8, 16) == 8
