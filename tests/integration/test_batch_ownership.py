"""With API keys on, files and batches belong to the key that made them: another key gets 404
for every one of them (never a hint that they exist) and never sees them in a list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.integration.batch_helpers import read_lines, request_line, submit, texts_for, wait_for
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

KEY_A = "sk-team-a-0123456789abcdef0123456789"
KEY_B = "sk-team-b-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root: Path = tmp_path_factory.mktemp("owners")
    process = ServerProcess(
        {"EMBEDPIPE_DATA_DIR": str(root / "data"), "EMBEDPIPE_API_KEYS": f"{KEY_A},{KEY_B}"},
        root / "server.log",
    ).start()
    yield process
    process.stop()


def _client(server: ServerProcess, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_another_key_sees_nothing_of_a_keys_files_and_batches(server: ServerProcess) -> None:
    with _client(server, KEY_A) as owner, _client(server, KEY_B) as other:
        texts = texts_for(20, "owned")
        batch = submit(owner, [request_line(key, text) for key, text in texts.items()])
        done = wait_for(owner, batch.id, ("completed",), timeout=120)
        assert done.output_file_id is not None
        assert len(read_lines(owner, done.output_file_id)) == 20

        for attempt in (
            lambda: other.batches.retrieve(batch.id),
            lambda: other.batches.cancel(batch.id),
            lambda: other.files.retrieve(batch.input_file_id),
            lambda: other.files.content(batch.input_file_id),
            lambda: other.files.content(done.output_file_id or ""),
            lambda: other.files.delete(batch.input_file_id),
            lambda: other.batches.create(
                input_file_id=batch.input_file_id,
                endpoint="/v1/embeddings",
                completion_window="24h",
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert batch.id not in [item.id for item in other.batches.list()]
        assert batch.input_file_id not in [item.id for item in other.files.list()]

        # The owner still has everything, and lists it.
        assert batch.id in [item.id for item in owner.batches.list()]
        listed = {item.id for item in owner.files.list()}
        assert {batch.input_file_id, done.output_file_id} <= listed
        assert owner.files.retrieve(batch.input_file_id).id == batch.input_file_id
