"""Properties of the pure parts every request goes through: the cache key, the vector
encodings, ``dimensions`` and the normalisation of ``input``."""

from __future__ import annotations

import base64
import hashlib
import unicodedata
import warnings
from functools import cache
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from embedpipe.cache.keys import VectorCodec, bytes_to_vector, cache_key, vector_to_bytes
from embedpipe.errors import InvalidInput
from embedpipe.inputs import TokenDecoder, normalize_input
from embedpipe.settings import LimitsSettings
from embedpipe.vectors import check_dimensions, to_base64, truncate
from tests.reliability.conftest import fuzz_settings

pytestmark = pytest.mark.reliability

LIMITS = LimitsSettings(max_inputs=16, max_input_chars=200)
DECODER = TokenDecoder()

# Every code point, unpaired surrogates (category Cs) included: what a Python str can hold.
any_text = st.text(st.characters(codec=None), max_size=30)
unicode_text = st.text(st.characters(codec="utf-8"), max_size=30)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
fingerprints = st.text("0123456789abcdef-", min_size=1, max_size=20)  # as the embedders make them


@cache
def _cl100k() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # bpe-openai reads its table so
        import bpe_openai

        return bpe_openai.get_encoding("cl100k_base")


# -- the cache key -------------------------------------------------------------------------


@given(namespace=names, fingerprint=names, text=unicode_text)
@fuzz_settings(examples=200)
def test_a_key_is_the_namespace_the_fingerprint_and_the_sha256_of_the_exact_text(
    namespace: str, fingerprint: str, text: str
) -> None:
    key = cache_key(namespace, fingerprint, text)
    assert key == cache_key(namespace, fingerprint, text)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert key == f"{namespace}:{fingerprint}:{digest}"


@st.composite
def near_texts(draw: st.DrawFn) -> tuple[str, str]:
    """Two texts a careless key would confuse: a space more, another case, another Unicode
    normal form, a cut, a NUL."""
    text = draw(unicode_text)
    other = draw(
        st.sampled_from(
            [
                text + " ",
                " " + text,
                text.upper(),
                unicodedata.normalize("NFD", text),
                unicodedata.normalize("NFKC", text),
                text[:-1],
                text + "\x00",
                text.replace("\n", "\r\n"),
            ]
        )
    )
    return text, other


@given(texts=near_texts() | st.tuples(unicode_text, unicode_text), fingerprint=fingerprints)
@fuzz_settings(examples=200)
def test_texts_that_differ_in_any_way_never_share_a_key(
    texts: tuple[str, str], fingerprint: str
) -> None:
    first, second = texts
    same_key = cache_key("ep", fingerprint, first) == cache_key("ep", fingerprint, second)
    assert same_key == (first == second)


@given(
    fingerprints=st.tuples(fingerprints, fingerprints),
    namespaces=st.tuples(names, names),
    text=unicode_text,
)
@fuzz_settings(examples=200)
def test_models_and_namespaces_never_share_a_key(
    fingerprints: tuple[str, str], namespaces: tuple[str, str], text: str
) -> None:
    """Fingerprints hold no ':' (hex, '-'), so a key names exactly one namespace and model:
    the same text under two models is two entries, never one served for the other."""
    (fp1, fp2), (ns1, ns2) = fingerprints, namespaces
    same_key = cache_key(ns1, fp1, text) == cache_key(ns2, fp2, text)
    assert same_key == ((ns1, fp1) == (ns2, fp2))


def test_each_stored_format_has_its_own_fingerprint() -> None:
    float32, float16 = VectorCodec("float32"), VectorCodec("float16")
    assert float32.fingerprint("abc") != float16.fingerprint("abc")
    assert cache_key("ep", float32.fingerprint("abc"), "t") != cache_key(
        "ep", float16.fingerprint("abc"), "t"
    )


@given(text=any_text)
@fuzz_settings(examples=300)
def test_any_python_string_gets_a_key_or_a_clean_400_before_it(text: str) -> None:
    """Unpaired surrogates cannot be hashed as UTF-8 (nor tokenized): input validation turns
    them away as InvalidInput, so whatever passes it has a key."""
    try:
        texts = normalize_input([text], LIMITS, DECODER)
    except InvalidInput:
        return
    for accepted in texts:
        assert cache_key("ep", "fp", accepted).startswith("ep:fp:")


# -- vector encodings ----------------------------------------------------------------------

float32_values = st.floats(width=32)  # NaN, infinities, -0.0 and subnormals included
# Whatever byte order or width the model hands over, the wire gets little-endian float32.
WIRE_DTYPES: list[np.dtype[Any]] = [np.dtype("<f4"), np.dtype(">f4"), np.dtype("<f8")]
vectors_1d: st.SearchStrategy[np.ndarray] = hnp.arrays(
    st.sampled_from(WIRE_DTYPES),
    st.integers(0, 64),
    elements=float32_values,
)


def _bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype="<f4").view("<u4")


@given(vector=vectors_1d)
@fuzz_settings(examples=200)
def test_base64_decodes_as_the_openai_sdk_does_bit_for_bit(vector: np.ndarray) -> None:
    encoded = to_base64(vector)
    # The openai SDK: np.frombuffer(base64.b64decode(data), dtype="float32").
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.shape == vector.shape
    np.testing.assert_array_equal(_bits(decoded), _bits(vector))


@given(
    matrix=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 4), st.integers(2, 16)), elements=float32_values
    ),
    step=st.integers(1, 3),
)
@fuzz_settings(examples=100)
def test_base64_of_a_strided_view_is_its_values(matrix: np.ndarray, step: int) -> None:
    view = matrix[:, ::step]  # not contiguous: what a cut of a batch can be
    for row in view:
        decoded = np.frombuffer(base64.b64decode(to_base64(row)), dtype="<f4")
        np.testing.assert_array_equal(_bits(decoded), _bits(row))


@given(vector=hnp.arrays(np.float32, st.integers(0, 64), elements=float32_values))
@fuzz_settings(examples=100)
def test_cache_values_round_trip_bit_for_bit(vector: np.ndarray) -> None:
    data = vector_to_bytes(vector)
    assert len(data) == 4 * vector.size
    np.testing.assert_array_equal(_bits(bytes_to_vector(data)), _bits(vector))
    float32 = VectorCodec("float32")
    np.testing.assert_array_equal(_bits(float32.decode(float32.encode(vector))), _bits(vector))


@given(
    vectors=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 16)),
        elements=st.floats(-1, 1, width=32),
    )
)
@fuzz_settings(examples=100)
def test_a_float16_cache_answers_a_miss_as_it_will_answer_the_hits(vectors: np.ndarray) -> None:
    codec = VectorCodec("float16")
    answered = codec.round_trip(vectors)
    for row, stored in zip(answered, (codec.encode(v) for v in vectors), strict=True):
        assert len(stored) == 2 * row.size
        np.testing.assert_array_equal(_bits(codec.decode(stored)), _bits(row))


# -- dimensions ----------------------------------------------------------------------------


@given(model=st.integers(1, 4096), data=st.data())
@fuzz_settings(examples=200)
def test_dimensions_from_1_to_the_model_size_and_nothing_else(model: int, data: Any) -> None:
    inside = data.draw(st.integers(1, model))
    assert check_dimensions(inside, model) == (None if inside == model else inside)
    assert check_dimensions(None, model) is None
    outside = data.draw(st.integers(max_value=0) | st.integers(min_value=model + 1))
    with pytest.raises(InvalidInput) as refused:
        check_dimensions(outside, model)
    assert refused.value.param == "dimensions"
    assert str(model) in refused.value.message


@given(size=st.integers(1, 10_000))
@fuzz_settings(examples=50)
def test_an_upstream_model_of_unknown_size_takes_any_positive_size(size: int) -> None:
    assert check_dimensions(size, 0) == size
    with pytest.raises(InvalidInput):
        check_dimensions(-size, 0)


@st.composite
def unit_vectors(draw: st.DrawFn) -> np.ndarray:
    rows, width = draw(st.integers(1, 4)), draw(st.integers(2, 64))
    raw = draw(hnp.arrays(np.float32, (rows, width), elements=st.floats(-1e3, 1e3, width=32)))
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    assume(bool(np.all(norms > 1e-3)))
    unit: np.ndarray = (raw / norms).astype(np.float32)
    return unit


@given(vectors=unit_vectors(), data=st.data())
@fuzz_settings(examples=100)
def test_truncation_keeps_the_prefix_direction_at_unit_length(
    vectors: np.ndarray, data: Any
) -> None:
    size = data.draw(st.integers(1, vectors.shape[1] - 1))
    cut = truncate(vectors, size)
    assert cut.shape == (vectors.shape[0], size)
    assert cut.dtype == np.float32 and cut.flags.c_contiguous
    prefix = vectors[:, :size].astype(np.float64)
    assert np.all(np.isfinite(cut))  # never a division by a zero norm
    for got, want in zip(cut.astype(np.float64), prefix, strict=True):
        norm = np.linalg.norm(want)
        if norm < 1e-18:  # no direction left in float32 (its square underflows): kept as is
            np.testing.assert_array_equal(got, want)
            continue
        assert abs(np.linalg.norm(got) - 1.0) < 1e-5
        np.testing.assert_allclose(got, want / norm, atol=1e-5)
    # The full size (or more) leaves the vectors alone.
    assert truncate(vectors, vectors.shape[1]) is vectors
    assert truncate(vectors, None) is vectors


# -- normalising ``input`` -----------------------------------------------------------------

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=20,
)


@given(value=json_like)
@fuzz_settings(examples=400)
def test_normalize_input_returns_texts_or_raises_invalid_input_only(value: Any) -> None:
    try:
        texts = normalize_input(value, LIMITS, DECODER)
    except InvalidInput as refused:
        assert refused.param == "input" and refused.message
        return
    assert 1 <= len(texts) <= LIMITS.max_inputs
    for text in texts:
        assert isinstance(text, str) and 1 <= len(text) <= LIMITS.max_input_chars
        text.encode("utf-8")  # what the tokenizer and the cache key need


@given(texts=st.lists(unicode_text.filter(bool), min_size=1, max_size=LIMITS.max_inputs))
@fuzz_settings(examples=150)
def test_strings_come_back_as_they_were_sent(texts: list[str]) -> None:
    assert normalize_input(texts[0], LIMITS, DECODER) == texts[:1]
    assert normalize_input(texts, LIMITS, DECODER) == texts


@given(texts=st.lists(unicode_text.filter(bool), min_size=1, max_size=4))
@fuzz_settings(examples=150)
def test_cl100k_token_ids_round_trip_to_the_exact_text(texts: list[str]) -> None:
    encoding = _cl100k()
    ids = [encoding.encode(text) for text in texts]
    assert normalize_input(ids[0], LIMITS, DECODER) == texts[:1]
    assert normalize_input(ids, LIMITS, DECODER) == texts


@given(
    good=st.lists(st.integers(0, 100_255), min_size=1, max_size=4),
    bad=st.integers(max_value=-1) | st.integers(min_value=100_277),
    at=st.integers(0, 4),
)
@fuzz_settings(examples=150)
def test_token_ids_outside_cl100k_are_a_400(good: list[int], bad: int, at: int) -> None:
    ids = [*good[:at], bad, *good[at:]]
    with pytest.raises(InvalidInput) as refused:
        normalize_input(ids, LIMITS, DECODER)
    assert refused.value.param == "input"
    with pytest.raises(InvalidInput):
        normalize_input([good, ids], LIMITS, DECODER)
