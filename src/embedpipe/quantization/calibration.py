"""Fixed per-model int8/uint8 ranges: the minimum and maximum of each dimension over the
model's vectors of a calibration corpus that ships with the package
(``calibration_corpus.txt``, 256 English texts of the Python documentation).

The record is those calibration vectors (float16), named by the model's fingerprint, so
another model or other weights never use these ranges. It is looked up

1. in the package (``records/<fingerprint>-c<format>.npy``: the bundled model's, so every
   machine and replica gives the same bytes, and start-up costs nothing), then
2. among the records made ahead of time (``made_ahead``: ``embedpipe models`` writes the
   record of a model on the ONNX backend beside its exports, ``<export dir>/calibration/``,
   so an image that bakes the exports in bakes their ranges in too and never calibrates at
   start), then
3. under the data dir (``<data_dir>/calibration/``: shared by the replicas of a stack), else
4. computed at load, before the model serves anything (one inference at a time), in fixed
   batches in corpus order, and written there for the next start.

The vectors are kept rather than only the ranges because a vector cut by ``dimensions`` is
renormalised: its components are larger than the full vector's, by a factor that depends on
the text. Its ranges are therefore those of the calibration vectors cut and renormalised the
same way (computed once per size, from the record), not a slice of the full-size ranges.
"""

from __future__ import annotations

import logging
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embedpipe.embedders import Embedder
from embedpipe.private_files import private_dir
from embedpipe.vectors import truncate

log = logging.getLogger("embedpipe.model")

# Bump when the corpus or the recipe changes: old records are then left unused.
RECORD_FORMAT = 1
CORPUS_FILE = "calibration_corpus.txt"
RECORDS_DIR = "calibration"
_BATCH_SIZE = 16


class Calibration:
    """A model's calibration vectors, and the ranges derived from them per output size."""

    def __init__(self, fingerprint: str, vectors: npt.NDArray[Any]) -> None:
        self.fingerprint = fingerprint
        self._vectors = np.asarray(vectors, dtype=np.float32)
        self._ranges: dict[int, npt.NDArray[np.float32]] = {}
        self._buckets: dict[int, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = {}

    @property
    def vectors(self) -> npt.NDArray[np.float32]:
        """The model's vectors of the calibration corpus (read-only)."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def ranges(self, width: int) -> npt.NDArray[np.float32]:
        """``(2, width)``: per dimension, the minimum and maximum over the calibration vectors
        cut to ``width`` and renormalised (the ``ranges`` of ``quantize_embeddings``)."""
        cached = self._ranges.get(width)
        if cached is None:
            cut = truncate(self._vectors, width)
            cached = np.vstack((cut.min(axis=0), cut.max(axis=0))).astype(np.float32)
            self._ranges[width] = cached
        return cached

    def buckets(self, width: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """``(starts, steps)`` of the 255 buckets per dimension, as ``quantize_embeddings``
        derives them from :meth:`ranges` (a step of 0 becomes 1): kept, not redone per call."""
        cached = self._buckets.get(width)
        if cached is None:
            ranges = self.ranges(width)
            starts = ranges[0]
            steps = (ranges[1] - starts) / 255
            cached = starts, np.where(steps == 0, 1, steps).astype(np.float32)
            self._buckets[width] = cached
        return cached


def calibration_texts() -> list[str]:
    corpus = resources.files("embedpipe.quantization").joinpath(CORPUS_FILE)
    return corpus.read_text(encoding="utf-8").splitlines()


def record_name(fingerprint: str) -> str:
    return f"{fingerprint}-c{RECORD_FORMAT}.npy"


def calibrate(embedder: Embedder, limit: int | None = None) -> npt.NDArray[np.float16]:
    """The model's vectors of the calibration corpus (its first ``limit`` texts), in fixed
    batches (slow: call it on a thread)."""
    texts = embedder.clip(calibration_texts()[:limit])
    batches = [
        embedder.embed(texts[start : start + _BATCH_SIZE])
        for start in range(0, len(texts), _BATCH_SIZE)
    ]
    return np.concatenate(batches).astype(np.float16)


def load_calibration(
    embedder: Embedder, data_dir: Path, *, made_ahead: Path | None = None
) -> Calibration:
    """The model's calibration: shipped, made ahead in ``made_ahead``, stored under
    ``data_dir``, or computed and stored there (see the module docstring). Call it before the
    model's batcher starts."""
    fingerprint = embedder.fingerprint
    found = _recorded(embedder, made_ahead)
    if found is not None:
        return Calibration(fingerprint, found)
    stored = data_dir / RECORDS_DIR / record_name(fingerprint)
    vectors = _read(stored, _expected_shape(embedder))
    if vectors is not None:
        return Calibration(fingerprint, vectors)
    log.info(
        "calibrating int8 ranges of %s on %d texts", embedder.info.name, len(calibration_texts())
    )
    vectors = calibrate(embedder)
    _write_atomically(stored, vectors)
    return Calibration(fingerprint, vectors)


def make_ahead(embedder: Embedder, directory: Path) -> Path | None:
    """Write the model's record into ``directory`` (``load_calibration``'s ``made_ahead``)
    unless the package ships it or a valid one is there: the path written, or None."""
    if _recorded(embedder, directory) is not None:
        return None
    log.info("calibrating int8 ranges of %s into %s", embedder.info.name, directory)
    target = directory / record_name(embedder.fingerprint)
    _write_atomically(target, calibrate(embedder))
    # Readable by every user (an image's build user is not its runtime user).
    directory.chmod(0o755)
    target.chmod(0o644)
    return target


def _expected_shape(embedder: Embedder) -> tuple[int, int]:
    return len(calibration_texts()), embedder.info.dimensions


def _recorded(embedder: Embedder, made_ahead: Path | None) -> npt.NDArray[Any] | None:
    """The record the package ships, else the one made ahead (None: neither, or not valid)."""
    name = record_name(embedder.fingerprint)
    expected = _expected_shape(embedder)
    shipped = resources.files("embedpipe.quantization").joinpath("records", name)
    if shipped.is_file():
        with shipped.open("rb") as handle:
            vectors = _valid(np.load(handle), expected)
        if vectors is not None:
            return vectors
    return _read(made_ahead / name, expected) if made_ahead is not None else None


def _read(path: Path, shape: tuple[int, int]) -> npt.NDArray[Any] | None:
    return _valid(np.load(path), shape) if path.is_file() else None


def _valid(vectors: npt.NDArray[Any], shape: tuple[int, int]) -> npt.NDArray[Any] | None:
    """The record, or None when it is not one vector per corpus text of the model's size (a
    partial or foreign file is recomputed, never used)."""
    if vectors.shape != shape or not np.all(np.isfinite(vectors)):
        return None
    return vectors


def _write_atomically(path: Path, vectors: npt.NDArray[np.float16]) -> None:
    """Readers (another replica) see the whole record or none."""
    private_dir(path.parent)
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, vectors)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def write_shipped_record() -> Path:
    """Recompute the bundled model's record into the package (after its fingerprint changed:
    a test fails when the bundled model has no shipped record). Minutes of model time:

        python -c "from embedpipe.quantization.calibration import write_shipped_record as w; w()"
    """
    from embedpipe.embedders.registry import load_embedder, parse_model_specs
    from embedpipe.settings import Settings

    settings = Settings()
    embedder = load_embedder(parse_model_specs("all-MiniLM-L6-v2", "")[0], settings)
    target = Path(__file__).with_name("records") / record_name(embedder.fingerprint)
    np.save(target, calibrate(embedder))
    return target
