"""Building batch input files and reading batch results, for the batch tests."""

from __future__ import annotations

import io
import json
import time
from typing import Any

from openai import OpenAI
from openai.types import Batch

from tests.integration.conftest import MODEL


def request_line(custom_id: str, input: str | list[str], **body: Any) -> str:
    """A line of a batch input file: ``body`` may name another model."""
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": input, **body},
        }
    )


def texts_for(count: int, prefix: str) -> dict[str, str]:
    return {
        f"{prefix}-{index}": f"{prefix} sentence number {index} about batches"
        for index in range(count)
    }


def submit(client: OpenAI, lines: list[str]) -> Batch:
    upload = client.files.create(
        file=("requests.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    return client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )


def wait_for(client: OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.3)


def read_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def vectors_by_custom_id(lines: list[dict[str, Any]]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for line in lines:
        assert line["custom_id"] not in found, f"{line['custom_id']} appears twice"
        assert line["response"]["status_code"] == 200
        found[line["custom_id"]] = line["response"]["body"]["data"][0]["embedding"]
    return found
