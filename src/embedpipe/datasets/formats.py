"""Dataset files in and vectors out, streamed in bounded memory.

Readers (chosen by extension, ``.gz`` allowed except for Parquet) yield every input row in
order as a :class:`Row` or, when its text or id is unusable, a :class:`BadRow`; the caller
decides whether a bad row is skipped or fatal. Row numbers are 0-based data rows (a CSV's
header is not a row) and are the ids when no id field is given.

>>> with open_reader(Path("corpus.jsonl.gz"), text_field="body", id_field="doc_id") as reader:
...     for row in reader:
...         ...

Writers take vectors a block at a time and never hold more than one row group::

    with open_writer(Path("out.parquet"), "parquet", dims=384, id_type=pa.int64(), rows=n) as w:
        w.write(ids, vectors)

Parquet output has columns ``id`` and ``embedding`` (a fixed-size ``float32`` list); ``.npy``
is the float32 matrix alone (row i = the i-th row written); JSONL has ``{"id", "embedding"}``.
Another output type (``embed --embedding-type``) is stored natively: float16 (Parquet
``halffloat``, ``<f2``), int8 and uint8 (binary/ubinary: the packed bytes); JSONL as numbers.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, cast, get_args

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedpipe.errors import DatasetError

OutputFormat = Literal["parquet", "npy", "jsonl"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
RowId = int | str

_INPUT_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
_OUTPUT_SUFFIXES: dict[str, OutputFormat] = {
    ".parquet": "parquet",
    ".npy": "npy",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
_BOM = b"\xef\xbb\xbf"
# A CSV cell may hold a whole document; the csv module's default limit is 128 KiB.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024
_PARQUET_READ_ROWS = 4096
_ROW_GROUP_ROWS = 8192  # ~12 MiB of 384-d vectors per Parquet row group


@dataclass(frozen=True, slots=True)
class Row:
    number: int
    id: RowId
    text: str


@dataclass(frozen=True, slots=True)
class BadRow:
    number: int
    reason: str

    def describe(self) -> str:
        return f"row {self.number}: {self.reason}"


def _split_gz(path: Path) -> tuple[str, bool]:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), gzipped


def input_kind(path: Path) -> str:
    suffix, gzipped = _split_gz(path)
    kind = _INPUT_SUFFIXES.get(suffix)
    if kind is None:
        known = ", ".join(sorted(_INPUT_SUFFIXES))
        raise DatasetError(f"cannot tell the format of {path.name}: use one of {known} (+ .gz)")
    if kind == "parquet" and gzipped:
        raise DatasetError("a Parquet file compresses its own pages: do not gzip it")
    return kind


def output_format(path: Path, requested: str | None = None) -> OutputFormat:
    """The format asked for, or the one the output's extension names."""
    if requested is not None:
        for known in OUTPUT_FORMATS:
            if known == requested:
                return known
        raise DatasetError(f"unknown output format {requested!r}: use {', '.join(OUTPUT_FORMATS)}")
    suffix, gzipped = _split_gz(path)
    fmt = _OUTPUT_SUFFIXES.get(suffix)
    if fmt is None or (gzipped and fmt != "jsonl"):
        raise DatasetError(
            f"cannot tell the output format of {path.name}: name it .parquet, .npy or .jsonl "
            "(.jsonl.gz), or pass --format"
        )
    return fmt


def _is_gzip(path: Path) -> bool:
    return _split_gz(path)[1]


def _check_text(value: object, field: str) -> str | None:
    """The reason a text value is unusable, or None when it is fine."""
    if value is None:
        return f"no text (field {field!r} is missing or null)"
    if not isinstance(value, str):
        return f"field {field!r} is not a string ({type(value).__name__})"
    if not value.strip():
        return f"empty text in field {field!r}"
    return None


def _text_id(value: object, field: str) -> str:
    """An id from JSON or CSV as a string; raises ValueError with the reason it is unusable."""
    if isinstance(value, str) and value != "":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or value == "":
        raise ValueError(f"no id (field {field!r} is missing or empty)")
    raise ValueError(f"id field {field!r} is not a string or integer ({type(value).__name__})")


class RowReader:
    """Iterates the rows of one input file; a context manager that closes it.

    ``position``/``total`` measure progress in the reader's own unit (bytes of the file as
    stored, or rows for Parquet), for a progress bar's ETA without counting rows first.
    """

    id_type: pa.DataType = pa.int64()
    total: int = 0

    def __init__(self, path: Path, text_field: str, id_field: str | None) -> None:
        self.path = path
        self.text_field = text_field
        self.id_field = id_field

    @property
    def position(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Row | BadRow]:
        try:
            yield from self._rows()
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{self.path.name} is not UTF-8 text ({exc.reason})") from None
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DatasetError(f"cannot read {self.path.name}: {exc}") from None

    def _rows(self) -> Iterator[Row | BadRow]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _FileReader(RowReader):
    """Line-based formats: the stored file (maybe gzip) and its byte position."""

    def __init__(self, path: Path, text_field: str, id_field: str | None) -> None:
        super().__init__(path, text_field, id_field)
        if id_field is not None:
            self.id_type = pa.string()
        self._raw = path.open("rb")
        self.total = path.stat().st_size
        self._stream: io.BufferedIOBase = (
            gzip.GzipFile(fileobj=self._raw, mode="rb") if _is_gzip(path) else self._raw
        )

    @property
    def position(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._stream.close()
        self._raw.close()

    def _lines(self) -> Iterator[bytes]:
        """Lines split on b"\\n" only (a lone \\r inside a text is kept), without the ending."""
        for number, line in enumerate(self._stream):
            if number == 0 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            yield line.rstrip(b"\r\n")


class TextReader(_FileReader):
    """Plain text, one text a line."""

    def __init__(self, path: Path, text_field: str, id_field: str | None) -> None:
        if id_field is not None:
            raise DatasetError("a .txt input has no fields: --id-field does not apply")
        super().__init__(path, text_field, id_field)

    def _rows(self) -> Iterator[Row | BadRow]:
        for number, line in enumerate(self._lines()):
            text = line.decode("utf-8")
            if text.strip():
                yield Row(number, number, text)
            else:
                yield BadRow(number, "empty line")


class JsonlReader(_FileReader):
    def _rows(self) -> Iterator[Row | BadRow]:
        for number, line in enumerate(self._lines()):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield BadRow(number, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                yield BadRow(number, f"not a JSON object ({type(record).__name__})")
                continue
            yield _record_row(number, record, self.text_field, self.id_field)


class CsvReader(_FileReader):
    def __init__(self, path: Path, text_field: str, id_field: str | None) -> None:
        super().__init__(path, text_field, id_field)
        self._text = io.TextIOWrapper(
            cast(IO[bytes], self._stream), encoding="utf-8-sig", newline=""
        )

    def close(self) -> None:
        self._text.close()
        super().close()

    def _rows(self) -> Iterator[Row | BadRow]:
        csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
        records = csv.DictReader(self._text)
        try:
            header = records.fieldnames or []
            for field in (self.text_field, self.id_field):
                if field is not None and field not in header:
                    raise DatasetError(
                        f"{self.path.name} has no column {field!r} (columns: {', '.join(header)})"
                    )
            for number, record in enumerate(records):
                yield _record_row(number, record, self.text_field, self.id_field)
        except csv.Error as exc:
            raise DatasetError(
                f"{self.path.name}: malformed CSV near line {records.line_num}: {exc}"
            ) from None


def _record_row(
    number: int, record: dict[str, Any], text_field: str, id_field: str | None
) -> Row | BadRow:
    text = record.get(text_field)
    problem = _check_text(text, text_field)
    if problem is not None:
        return BadRow(number, problem)
    assert isinstance(text, str)
    if id_field is None:
        return Row(number, number, text)
    try:
        return Row(number, _text_id(record.get(id_field), id_field), text)
    except ValueError as exc:
        return BadRow(number, str(exc))


class ParquetReader(RowReader):
    """Reads record batches of the needed columns only; progress in rows."""

    def __init__(self, path: Path, text_field: str, id_field: str | None) -> None:
        super().__init__(path, text_field, id_field)
        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"cannot read {path.name} as Parquet: {exc}") from None
        schema = self._file.schema_arrow
        self.total = self._file.metadata.num_rows
        self._done = 0
        for field in (text_field, id_field):
            if field is not None and schema.get_field_index(field) < 0:
                raise DatasetError(
                    f"{path.name} has no column {field!r} (columns: {', '.join(schema.names)})"
                )
        text_type = schema.field(text_field).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise DatasetError(f"column {text_field!r} is {text_type}, not a string column")
        if id_field is not None:
            id_type = schema.field(id_field).type
            if pa.types.is_integer(id_type):
                self.id_type = pa.int64()
            elif pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
                self.id_type = pa.string()
            else:
                raise DatasetError(f"id column {id_field!r} is {id_type}: use integers or strings")

    @property
    def position(self) -> int:
        return self._done

    def close(self) -> None:
        self._file.close()

    def _rows(self) -> Iterator[Row | BadRow]:
        columns = [self.text_field] if self.id_field is None else [self.text_field, self.id_field]
        try:
            for batch in self._file.iter_batches(batch_size=_PARQUET_READ_ROWS, columns=columns):
                texts = batch.column(self.text_field).to_pylist()
                ids = batch.column(self.id_field).to_pylist() if self.id_field else None
                for offset, text in enumerate(texts):
                    number = self._done + offset
                    problem = _check_text(text, self.text_field)
                    row_id = number if ids is None else ids[offset]
                    if problem is None and row_id is None:
                        problem = f"no id (column {self.id_field!r} is null)"
                    if problem is None:
                        yield Row(number, row_id, text)
                    else:
                        yield BadRow(number, problem)
                self._done += len(texts)
        except pa.ArrowException as exc:
            raise DatasetError(f"cannot read {self.path.name}: {exc}") from None


_READERS: dict[str, type[RowReader]] = {
    "jsonl": JsonlReader,
    "csv": CsvReader,
    "parquet": ParquetReader,
    "text": TextReader,
}


def open_reader(path: Path, *, text_field: str = "text", id_field: str | None = None) -> RowReader:
    """The reader for ``path``'s extension (``.jsonl/.ndjson/.csv/.parquet/.txt``, + ``.gz``)."""
    kind = input_kind(path)
    try:
        return _READERS[kind](path, text_field, id_field)
    except OSError as exc:
        raise DatasetError(f"cannot open {path}: {exc.strerror or exc}") from None


# --- writers -------------------------------------------------------------------------------

Matrix = npt.NDArray[np.float32]
# What the writers take: float32 vectors, or another output type's rows (float16, int8,
# uint8, packed bits), stored natively.
AnyMatrix = npt.NDArray[Any]


def embedding_type(dims: int, dtype: npt.DTypeLike = np.float32) -> pa.DataType:
    return pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), dims)


def vectors_to_arrow(vectors: AnyMatrix) -> pa.FixedSizeListArray:
    """A (n, dims) matrix as a fixed-size list array of its dtype, without copying."""
    flat = np.ascontiguousarray(vectors).reshape(-1)
    values = pa.array(flat, type=pa.from_numpy_dtype(flat.dtype))
    return pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])


class VectorWriter:
    """Appends (ids, vectors) blocks to an output file; ``close()`` finishes it."""

    def __init__(
        self, path: Path, dims: int, id_type: pa.DataType, dtype: npt.DTypeLike = np.float32
    ) -> None:
        self.path = path
        self.dims = dims
        self.id_type = id_type
        self.dtype = np.dtype(dtype)
        self.rows = 0

    def write(self, ids: Sequence[RowId] | pa.Array, vectors: AnyMatrix) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dims or len(ids) != len(vectors):
            raise ValueError(f"expected {len(ids)} x {self.dims} vectors, got {vectors.shape}")
        self._write(ids, vectors.astype(self.dtype, copy=False))
        self.rows += len(vectors)

    def _write(self, ids: Sequence[RowId] | pa.Array, vectors: AnyMatrix) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ParquetVectorWriter(VectorWriter):
    """Columns ``id`` and ``embedding`` (fixed-size list of the writer's dtype), one row group
    per ~``row_group_rows`` rows."""

    def __init__(
        self,
        path: Path,
        dims: int,
        id_type: pa.DataType,
        metadata: dict[str, str] | None = None,
        row_group_rows: int = _ROW_GROUP_ROWS,
        dtype: npt.DTypeLike = np.float32,
    ) -> None:
        super().__init__(path, dims, id_type, dtype)
        self.schema = pa.schema(
            [
                pa.field("id", id_type, nullable=False),
                ("embedding", embedding_type(dims, self.dtype)),
            ],
            metadata=metadata,
        )
        # Neither unique ids nor float vectors repeat: dictionary pages would only cost time.
        self._writer = pq.ParquetWriter(path, self.schema, use_dictionary=False)
        self._row_group_rows = row_group_rows
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def _write(self, ids: Sequence[RowId] | pa.Array, vectors: AnyMatrix) -> None:
        id_array = ids if isinstance(ids, pa.Array) else pa.array(ids, type=self.id_type)
        batch = pa.RecordBatch.from_arrays(
            [id_array.cast(self.id_type), vectors_to_arrow(vectors)], schema=self.schema
        )
        self._pending.append(batch)
        self._pending_rows += len(batch)
        if self._pending_rows >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            self._writer.write_table(table, row_group_size=max(len(table), 1))
            self._pending = []
            self._pending_rows = 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


class NpyVectorWriter(VectorWriter):
    """An ``.npy`` matrix of the writer's dtype (little-endian): the header is written for the
    final shape, then raw rows."""

    def __init__(
        self,
        path: Path,
        dims: int,
        id_type: pa.DataType,
        rows: int,
        dtype: npt.DTypeLike = np.float32,
    ) -> None:
        super().__init__(path, dims, id_type, np.dtype(dtype).newbyteorder("<"))
        self._expected = rows
        self._file = path.open("wb")
        header = {"descr": self.dtype.str, "fortran_order": False, "shape": (rows, dims)}
        np.lib.format.write_array_header_1_0(self._file, header)

    def _write(self, ids: Sequence[RowId] | pa.Array, vectors: AnyMatrix) -> None:
        if self.rows + len(vectors) > self._expected:
            raise ValueError(f"more than the {self._expected} rows announced")
        self._file.write(np.ascontiguousarray(vectors).tobytes())

    def close(self) -> None:
        self._file.close()
        if self.rows != self._expected:
            raise ValueError(f"{self.rows} rows written, {self._expected} announced")


class JsonlVectorWriter(VectorWriter):
    """``{"id": ..., "embedding": [...]}`` per line (gzip when the name ends in ``.gz``)."""

    def __init__(
        self, path: Path, dims: int, id_type: pa.DataType, dtype: npt.DTypeLike = np.float32
    ) -> None:
        super().__init__(path, dims, id_type, dtype)
        # Closed by close(), like every writer here.
        self._file: io.BufferedIOBase = (
            gzip.GzipFile(path, "wb", compresslevel=6) if _is_gzip(path) else path.open("wb")
        )

    def _write(self, ids: Sequence[RowId] | pa.Array, vectors: AnyMatrix) -> None:
        id_list = ids.to_pylist() if isinstance(ids, pa.Array) else ids
        if vectors.dtype == np.float16:  # orjson has no float16: the same values as float32
            vectors = vectors.astype(np.float32)
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        self._file.write(
            b"".join(
                orjson.dumps({"id": row_id, "embedding": vector}, option=option)
                for row_id, vector in zip(id_list, vectors, strict=True)
            )
        )

    def close(self) -> None:
        self._file.close()


def open_writer(
    path: Path,
    fmt: OutputFormat,
    *,
    dims: int,
    id_type: pa.DataType,
    rows: int,
    metadata: dict[str, str] | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> VectorWriter:
    """A writer of ``fmt``; ``rows`` is the exact count that will be written (the ``.npy``
    header needs it); ``metadata`` goes into a Parquet file's schema; ``dtype``: the values'
    type (float32, or an output type's: float16, int8, uint8), stored natively."""
    if fmt == "parquet":
        return ParquetVectorWriter(path, dims, id_type, metadata, dtype=dtype)
    if fmt == "npy":
        return NpyVectorWriter(path, dims, id_type, rows, dtype)
    return JsonlVectorWriter(path, dims, id_type, dtype)
