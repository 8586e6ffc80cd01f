"""The Files + Batch API on the embedded default (jobs run inside the server process)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.integration.batch_helpers import (
    read_lines,
    request_line,
    submit,
    texts_for,
    vectors_by_custom_id,
    wait_for,
)
from tests.integration.conftest import assert_same_vectors, reference_vectors
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]


@pytest.fixture(scope="module")
def client(embedded_server: ServerProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{embedded_server.url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_sdk_round_trip_with_invalid_lines_in_the_error_file(
    client: OpenAI, reference_model: Any
) -> None:
    texts = texts_for(120, "roundtrip")
    lines = [request_line(custom_id, text) for custom_id, text in texts.items()]
    lines += [
        "this line is not json",
        request_line("unknown-model", "x", model="no-such-model"),
        request_line("empty-input", ""),
        request_line("roundtrip-0", "a duplicate custom_id"),
        request_line("short", "short vectors", dimensions=8, encoding_format="base64"),
    ]
    batch = submit(client, lines)
    assert batch.status == "validating" and batch.endpoint == "/v1/embeddings"
    done = wait_for(client, batch.id, ("completed", "failed"), timeout=180)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (125, 121)
    assert done.request_counts.failed == 4
    output = read_lines(client, done.output_file_id)
    short = [line for line in output if line["custom_id"] == "short"]
    assert len(short) == 1
    vectors = vectors_by_custom_id([line for line in output if line["custom_id"] != "short"])
    assert set(vectors) == set(texts)
    ids = list(texts)
    assert_same_vectors(
        [vectors[i] for i in ids], reference_vectors(reference_model, [texts[i] for i in ids])
    )
    errors = read_lines(client, done.error_file_id)
    by_code = {
        (line["error"] or {}).get("code") or line["response"]["status_code"]: line
        for line in errors
    }
    assert set(by_code) == {"invalid_json", "duplicate_custom_id", 404, 400}
    assert by_code[404]["custom_id"] == "unknown-model"
    assert by_code[404]["response"]["body"]["error"]["code"] == "model_not_found"
    assert by_code[400]["custom_id"] == "empty-input"
    listed = client.batches.list(limit=100)
    assert done.id in [item.id for item in listed.data]


def test_a_malformed_file_fails_validation_with_a_clear_message(client: OpenAI) -> None:
    batch = submit(client, ["not json", "{also not json"])
    failed = wait_for(client, batch.id, ("failed", "completed"), timeout=60)
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data
    assert failed.errors.data[0].code == "invalid_json"
    assert failed.errors.data[0].line == 1


def test_cancel_stops_scheduling_new_chunks(client: OpenAI) -> None:
    lines = [request_line(key, text * 8) for key, text in texts_for(1500, "cancel").items()]
    batch = submit(client, lines)
    wait_for(client, batch.id, ("in_progress",), timeout=60)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(client, batch.id, ("cancelled",), timeout=120)
    assert done.request_counts is not None
    assert done.request_counts.completed < 1500
    output = read_lines(client, done.output_file_id)
    assert len(output) == done.request_counts.completed
    vectors_by_custom_id(output)  # no custom_id twice


def test_files_api_errors_and_deletion(client: OpenAI, embedded_server: ServerProcess) -> None:
    upload = client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert client.files.retrieve(upload.id).bytes == 3
    assert client.files.content(upload.id).content == b"{}\n"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert client.files.delete(upload.id).deleted is True
    for path in (
        f"/v1/files/{upload.id}",
        "/v1/files/..%2F..%2Fetc%2Fpasswd/content",
        "/v1/batches/batch_nope",
    ):
        reply = httpx.get(embedded_server.url + path)
        assert reply.status_code == 404, path
        assert reply.json()["error"]["message"]


def test_a_batch_survives_a_server_restart(tmp_path: Path, reference_model: Any) -> None:
    server = ServerProcess(
        {"EMBEDPIPE_DATA_DIR": str(tmp_path / "data"), "EMBEDPIPE_JOBS__CHUNK_SIZE": "20"},
        tmp_path / "server.log",
    ).start()
    texts = texts_for(600, "restart")
    try:
        with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as sdk:
            batch = submit(sdk, [request_line(key, text) for key, text in texts.items()])
            wait_for(sdk, batch.id, ("in_progress",), timeout=60)
        server.stop()  # mid-job
        server.start()
        with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as sdk:
            done = wait_for(sdk, batch.id, ("completed",), timeout=240)
            vectors = vectors_by_custom_id(read_lines(sdk, done.output_file_id))
    finally:
        server.stop()
    assert set(vectors) == set(texts)
    sample = list(texts)[::50]
    assert_same_vectors(
        [vectors[k] for k in sample], reference_vectors(reference_model, [texts[k] for k in sample])
    )
