"""Dataset readers and vector writers: every format round trip, gzip, bad rows, errors."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.datasets.formats import (
    BadRow,
    Row,
    RowId,
    open_reader,
    open_writer,
    output_format,
)
from embedpipe.errors import DatasetError

TEXTS = ["first text", "a second, with a comma", 'quotes " and \\ slashes', "ünïcødé ✓"]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def read_all(
    path: Path, text_field: str = "text", id_field: str | None = None
) -> list[Row | BadRow]:
    with open_reader(path, text_field=text_field, id_field=id_field) as reader:
        rows = list(reader)
        assert reader.position == reader.total  # a progress bar ends at 100%
    return rows


@pytest.mark.parametrize("name", ["in.jsonl", "in.ndjson", "in.jsonl.gz"])
def test_jsonl_rows_with_and_without_ids(tmp_path: Path, name: str) -> None:
    lines = [json.dumps({"doc": f"d{i}", "body": text}) for i, text in enumerate(TEXTS)]
    path = _write(tmp_path / name, ("\n".join(lines) + "\n").encode())
    assert read_all(path, text_field="body") == [Row(i, i, t) for i, t in enumerate(TEXTS)]
    assert read_all(path, text_field="body", id_field="doc") == [
        Row(i, f"d{i}", t) for i, t in enumerate(TEXTS)
    ]


def test_jsonl_bad_rows_are_reported_with_their_row_number(tmp_path: Path) -> None:
    lines = [
        b'{"text": "fine", "id": 7}',
        b'{"text": ""}',
        b'{"text": "   "}',
        b'{"other": "x"}',
        b'{"text": 12}',
        b"not json",
        b"[1, 2]",
        b"",
        b'{"text": "no id"}',
        b'{"text": "bool id", "id": true}',
    ]
    rows = read_all(_write(tmp_path / "in.jsonl", b"\n".join(lines)), id_field="id")
    assert rows[0] == Row(0, "7", "fine")  # JSON integer ids are written as strings
    assert all(isinstance(row, BadRow) for row in rows[1:])
    reasons = [row.reason for row in rows[1:] if isinstance(row, BadRow)]
    assert [row.number for row in rows] == list(range(len(lines)))
    assert "empty text" in reasons[0] and "empty text" in reasons[1]
    assert "missing" in reasons[2]
    assert "not a string" in reasons[3]
    assert "not valid JSON" in reasons[4] and "not valid JSON" in reasons[6]
    assert "not a JSON object" in reasons[5]
    assert "no id" in reasons[7]
    assert "not a string or integer" in reasons[8]
    assert BadRow(3, "x").describe() == "row 3: x"


def test_jsonl_keeps_crlf_texts_and_a_bom_out(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two\\r\\nlines"}\r\n'
    assert read_all(_write(tmp_path / "in.jsonl", data)) == [
        Row(0, 0, "one"),
        Row(1, 1, "two\r\nlines"),
    ]


@pytest.mark.parametrize("name", ["in.csv", "in.csv.gz"])
def test_csv_rows_quoting_and_multiline_cells(tmp_path: Path, name: str) -> None:
    texts = [*TEXTS, "a cell\nover two lines"]
    path = tmp_path / "plain.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([[f"r{i}", text] for i, text in enumerate(texts)])
    path = _write(tmp_path / name, path.read_bytes())
    assert read_all(path, id_field="id") == [Row(i, f"r{i}", t) for i, t in enumerate(texts)]


def test_csv_missing_cells_and_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "in.csv", b"id,text\n1,fine\n2\n3,\n")
    rows = read_all(path, id_field="id")
    assert rows[0] == Row(0, "1", "fine")
    assert isinstance(rows[1], BadRow) and "missing" in rows[1].reason
    assert isinstance(rows[2], BadRow) and "empty text" in rows[2].reason
    with pytest.raises(DatasetError, match="no column 'body'"):
        read_all(path, text_field="body")


def test_csv_cells_larger_than_the_csv_module_default(tmp_path: Path) -> None:
    big = "word " * 40_000  # 200 KB, over csv's 128 KiB default field limit
    path = _write(tmp_path / "in.csv", f'text\n"{big}"\n'.encode())
    assert read_all(path) == [Row(0, 0, big)]


@pytest.mark.parametrize("name", ["in.txt", "in.txt.gz"])
def test_text_lines(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, b"\n".join(t.encode() for t in TEXTS) + b"\n\nlast")
    rows = read_all(path)
    assert rows[:4] == [Row(i, i, t) for i, t in enumerate(TEXTS)]
    assert isinstance(rows[4], BadRow) and rows[4].number == 4
    assert rows[5] == Row(5, 5, "last")
    with pytest.raises(DatasetError, match="--id-field"):
        open_reader(path, id_field="id")


def test_parquet_rows_in_batches_with_typed_ids(tmp_path: Path) -> None:
    n = 10_000  # more than one record batch
    table = pa.table(
        {
            "key": pa.array(range(100, 100 + n), pa.int32()),
            "name": [f"n{i}" for i in range(n)],
            "text": [None if i == 5 else f"text {i}" for i in range(n)],
            "other": [1.0] * n,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=3000)
    with open_reader(tmp_path / "in.parquet", id_field="key") as reader:
        assert reader.id_type == pa.int64()
        rows = list(reader)
    assert len(rows) == n and rows[0] == Row(0, 100, "text 0") and rows[-1].number == n - 1
    assert isinstance(rows[5], BadRow) and "null" in rows[5].reason
    with open_reader(tmp_path / "in.parquet", id_field="name") as reader:
        assert reader.id_type == pa.string()
        assert next(iter(reader)) == Row(0, "n0", "text 0")
    with pytest.raises(DatasetError, match="not a string column"):
        open_reader(tmp_path / "in.parquet", text_field="other")
    with pytest.raises(DatasetError, match="integers or strings"):
        open_reader(tmp_path / "in.parquet", id_field="other")
    with pytest.raises(DatasetError, match="no column 'body'"):
        open_reader(tmp_path / "in.parquet", text_field="body")


def test_unusable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot tell the format"):
        open_reader(_write(tmp_path / "in.xml", b"<a/>"))
    with pytest.raises(DatasetError, match="do not gzip"):
        open_reader(_write(tmp_path / "in.parquet.gz", b"x"))
    with pytest.raises(DatasetError, match="as Parquet"):
        open_reader(_write(tmp_path / "bad.parquet", b"not parquet"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_all(_write(tmp_path / "latin1.txt", "café\n".encode("latin-1")))
    (tmp_path / "broken.txt.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DatasetError, match="cannot read"):
        read_all(tmp_path / "broken.txt.gz")
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(b"a line\n" * 1000)[:-20])
    with pytest.raises(DatasetError, match="cannot read"):
        read_all(tmp_path / "cut.txt.gz")


# --- writers -------------------------------------------------------------------------------


def _vectors(n: int, dims: int = 8) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, dims)).astype(np.float32)


def _write_blocks(path: Path, fmt: str, ids: list[RowId], vectors: np.ndarray) -> None:
    id_type = pa.int64() if isinstance(ids[0], int) else pa.string()
    with open_writer(
        path,
        output_format(path, fmt),
        dims=vectors.shape[1],
        id_type=id_type,
        rows=len(ids),
        metadata={"embedpipe.model": "m"},
    ) as writer:
        for start in range(0, len(ids), 3000):  # blocks like the parts of a job
            writer.write(ids[start : start + 3000], vectors[start : start + 3000])
        writer.write([], np.empty((0, vectors.shape[1]), np.float32))  # an empty chunk


@pytest.mark.parametrize("ids", [list(range(10_000)), [f"id-{i}" for i in range(10_000)]])
def test_parquet_writer_fixed_size_float32_list_in_row_groups(
    tmp_path: Path, ids: list[RowId]
) -> None:
    vectors = _vectors(len(ids))
    path = tmp_path / "out.parquet"
    _write_blocks(path, "parquet", ids, vectors)
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    assert schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert pa.types.is_fixed_size_list(schema.field("embedding").type)
    assert schema.metadata[b"embedpipe.model"] == b"m"
    assert parquet.metadata.num_row_groups == 2  # ~8192 rows a group, never one per block
    table = parquet.read()
    assert table.column("id").to_pylist() == ids
    got = table.column("embedding").combine_chunks().values.to_numpy().reshape(-1, 8)
    np.testing.assert_array_equal(got, vectors)


def test_npy_writer_streams_the_final_shape(tmp_path: Path) -> None:
    vectors = _vectors(7000)
    path = tmp_path / "out.npy"
    _write_blocks(path, "npy", list(range(7000)), vectors)
    loaded = np.load(path)
    assert loaded.dtype == np.float32 and loaded.shape == (7000, 8)
    np.testing.assert_array_equal(loaded, vectors)
    short = open_writer(tmp_path / "short.npy", "npy", dims=8, id_type=pa.int64(), rows=5)
    short.write([0], vectors[:1])
    with pytest.raises(ValueError, match="announced"):
        short.close()


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_jsonl_writer(tmp_path: Path, name: str) -> None:
    vectors = _vectors(4000)
    ids: list[RowId] = [f"x{i}" for i in range(4000)]
    path = tmp_path / name
    _write_blocks(path, "jsonl", ids, vectors)
    data = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    records = [orjson.loads(line) for line in data.splitlines()]
    assert [record["id"] for record in records] == ids
    np.testing.assert_allclose(
        np.array([record["embedding"] for record in records], np.float32), vectors
    )


def test_writer_rejects_wrong_shapes(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "o.jsonl", "jsonl", dims=8, id_type=pa.int64(), rows=0)
    with writer, pytest.raises(ValueError, match="x 8 vectors"):
        writer.write([1, 2], _vectors(2, dims=4))


def test_output_format_from_extension_or_flag() -> None:
    assert output_format(Path("a.parquet")) == "parquet"
    assert output_format(Path("a.NPY")) == "npy"
    assert output_format(Path("a.jsonl.gz")) == "jsonl"
    assert output_format(Path("a.out"), "jsonl") == "jsonl"
    with pytest.raises(DatasetError, match="--format"):
        output_format(Path("a.out"))
    with pytest.raises(DatasetError, match="--format"):
        output_format(Path("a.npy.gz"))
    with pytest.raises(DatasetError, match="unknown output format"):
        output_format(Path("a.parquet"), "csv")
