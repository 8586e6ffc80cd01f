"""Output types (``embedding_type``) and their per-model calibration, with a fake model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedpipe.errors import InvalidInput
from embedpipe.quantization import Calibration, check_output_type, load_calibration, quantize
from embedpipe.quantization.calibration import calibration_texts, make_ahead, record_name
from embedpipe.quantization.output_types import to_base64_of_type
from embedpipe.vectors import truncate
from tests.fakes import FakeEmbedder, vector_for


def _unit_rows(count: int, dimensions: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dimensions)).astype(np.float32)
    normalized: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normalized


def test_binary_packs_sign_bits_big_endian_and_signed_is_minus_128() -> None:
    vector = np.array([[1, -1, 1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1, -1, -1]], np.float32)
    assert quantize(vector, "ubinary").tolist() == [[0b10100001, 0]]
    assert quantize(vector, "binary").tolist() == [[0b10100001 - 128, -128]]
    assert quantize(vector, "binary").dtype == np.int8


def test_int8_buckets_span_the_calibrated_range_and_clip_outside_it() -> None:
    calibration = Calibration("fp", np.array([[-1.0, 0.0], [1.0, 0.5]], np.float32))
    vectors = np.array([[-1.0, 0.0], [5.0, -5.0], [0.0, 0.25], [0.999, 0.499]], np.float32)
    assert quantize(vectors, "uint8", calibration).tolist() == [
        [0, 0],
        [255, 0],
        [127, 127],
        [254, 254],
    ]
    assert quantize(vectors, "int8", calibration).tolist() == [
        [-128, -128],
        [127, -128],
        [-1, -1],
        [126, 126],
    ]


@pytest.mark.parametrize("embedding_type", ["int8", "uint8", "binary", "ubinary"])
def test_every_type_is_byte_for_byte_what_quantize_embeddings_gives(embedding_type: str) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    calibration = Calibration("fp", _unit_rows(256, 64, seed=1))
    # Past the calibrated ranges too (clipped), and on bucket edges.
    vectors = np.vstack((_unit_rows(500, 64, seed=2) * 1.5, calibration.ranges(64)))
    want = np.asarray(
        quantize_embeddings(vectors, embedding_type, ranges=calibration.ranges(64))  # type: ignore[arg-type]
    )
    got = quantize(vectors, embedding_type, calibration)  # type: ignore[arg-type]
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_float16_and_float32() -> None:
    vectors = _unit_rows(3, 16)
    assert quantize(vectors, "float32") is vectors
    half = quantize(vectors, "float16")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), vectors, atol=1e-3)


def test_ranges_of_a_cut_vector_are_those_of_the_renormalised_calibration_vectors() -> None:
    vectors = _unit_rows(50, 16)
    calibration = Calibration("fp", vectors)
    full = calibration.ranges(16)
    np.testing.assert_array_equal(full, [vectors.min(axis=0), vectors.max(axis=0)])
    cut = truncate(vectors, 4)
    np.testing.assert_array_equal(calibration.ranges(4), [cut.min(axis=0), cut.max(axis=0)])
    # Renormalised, the first components grow: the full ranges' slice would clip them.
    assert (calibration.ranges(4)[1] >= full[1, :4]).all()
    assert (calibration.ranges(4)[1] > full[1, :4]).any()


def test_base64_carries_the_raw_bytes_of_the_type() -> None:
    import base64

    row = np.array([-128, 0, 127], np.int8)
    assert base64.b64decode(to_base64_of_type(row, "int8")) == row.tobytes()
    half = np.array([0.5, -0.25], np.float16)
    assert np.frombuffer(base64.b64decode(to_base64_of_type(half, "float16")), "<f2").tolist() == [
        0.5,
        -0.25,
    ]


def test_a_size_that_binary_cannot_pack_names_the_field_that_chose_it() -> None:
    calibration = Calibration("fp", _unit_rows(4, 16))
    with pytest.raises(InvalidInput) as error:
        check_output_type("binary", 12, calibration, dimensions_param="dimensions")
    assert error.value.param == "dimensions"
    with pytest.raises(InvalidInput) as error:
        check_output_type("ubinary", 12, calibration)
    assert error.value.param == "embedding_type"
    check_output_type("binary", 16, calibration)
    check_output_type("int8", 12, calibration)


def test_int8_without_a_calibration_is_bad_input_on_embedding_type() -> None:
    with pytest.raises(InvalidInput) as error:
        check_output_type("uint8", 16, None)
    assert error.value.param == "embedding_type"
    check_output_type("binary", 16, None)
    check_output_type("float16", 16, None)


def test_a_model_is_calibrated_once_on_the_shipped_corpus_and_the_record_reused(
    tmp_path: Path,
) -> None:
    embedder = FakeEmbedder(dimensions=16)
    first = load_calibration(embedder, tmp_path)
    texts = calibration_texts()
    assert len(texts) == 256 and len(set(texts)) == 256
    assert [text for call in embedder.calls for text in call] == texts
    record = tmp_path / "calibration" / record_name(embedder.fingerprint)
    assert record.is_file() and record.stat().st_mode & 0o777 == 0o600
    want = np.stack([vector_for(text, 16) for text in texts]).astype(np.float16)
    np.testing.assert_array_equal(first.ranges(16), [want.min(axis=0), want.max(axis=0)])

    embedder.calls.clear()
    again = load_calibration(embedder, tmp_path)
    assert embedder.calls == []  # read from the record
    np.testing.assert_array_equal(again.ranges(16), first.ranges(16))


def test_another_model_never_uses_a_record_and_a_broken_record_is_recomputed(
    tmp_path: Path,
) -> None:
    load_calibration(FakeEmbedder("one", dimensions=16), tmp_path)
    other = FakeEmbedder("two", dimensions=16)
    load_calibration(other, tmp_path)
    assert other.calls  # its own fingerprint: its own record
    record = tmp_path / "calibration" / record_name(other.fingerprint)
    np.save(record, np.zeros((3, 16), np.float16))  # not one vector per corpus text
    other.calls.clear()
    load_calibration(other, tmp_path)
    assert other.calls
    assert np.load(record).shape == (256, 16)


def test_a_record_made_ahead_is_used_at_load_and_never_written_to_the_data_dir(
    tmp_path: Path,
) -> None:
    """``embedpipe models`` makes an ONNX model's ranges beside its exports (an image build),
    so a process that loads them calibrates nothing and writes nothing at start."""
    embedder = FakeEmbedder("exported", dimensions=16)
    made_ahead = tmp_path / "onnx" / "calibration"
    written = make_ahead(embedder, made_ahead)
    assert written == made_ahead / record_name(embedder.fingerprint)
    # Readable by another user than the one that made it (the image's runtime user).
    assert written.stat().st_mode & 0o777 == 0o644
    assert made_ahead.stat().st_mode & 0o777 == 0o755
    assert make_ahead(embedder, made_ahead) is None  # already there: not made again

    embedder.calls.clear()
    data_dir = tmp_path / "data"
    loaded = load_calibration(embedder, data_dir, made_ahead=made_ahead)
    assert embedder.calls == [] and not data_dir.exists()
    want = np.stack([vector_for(text, 16) for text in calibration_texts()]).astype(np.float16)
    np.testing.assert_array_equal(loaded.ranges(16), [want.min(axis=0), want.max(axis=0)])


def test_a_foreign_record_made_ahead_is_ignored(tmp_path: Path) -> None:
    embedder = FakeEmbedder("exported", dimensions=16)
    made_ahead = tmp_path / "calibration"
    made_ahead.mkdir()
    np.save(made_ahead / record_name(embedder.fingerprint), np.zeros((3, 16), np.float16))
    load_calibration(embedder, tmp_path / "data", made_ahead=made_ahead)
    assert embedder.calls  # computed, and stored under the data dir instead
    assert (tmp_path / "data" / "calibration" / record_name(embedder.fingerprint)).is_file()
