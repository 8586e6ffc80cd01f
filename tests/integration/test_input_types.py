"""Input types and prompts, truncation side, ``truncate: false`` and ``long_text: "mean"`` on
``/v1/embeddings``, against the reference library, with the bundled model and local models
with prompts (``prompts_server``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI

from embedpipe.embedders.model_files import plain_copy
from embedpipe.embedders.tokens import TextTokenizer
from embedpipe.settings import ModelOptions
from tests.integration.batch_helpers import read_lines, request_line, submit, wait_for
from tests.integration.conftest import (
    LONG_OVERLAP_TOKENS,
    LONG_WINDOW_TOKENS,
    MAX_INPUT_TOKENS_LONG,
    MODEL,
    MODEL_OPTIONS,
    PROMPTED_MODELS,
    reference_vectors,
)
from tests.integration.test_embed_cli import embed_cli, read_output, write_jsonl
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

TEXTS = ["What is an embedding?", "Vectors let a search engine compare meaning, not words."]
# About 900 tokens: several windows of the bundled model.
LONG_TEXT = " ".join(
    f"Sentence {i} talks about topic {i % 7}, with words like retrieval and ranking."
    for i in range(60)
)


@pytest.fixture(scope="module")
def http(prompts_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=prompts_server.url, timeout=120) as client:
        yield client


def _embed(http: httpx.Client, **body: Any) -> tuple[np.ndarray, int]:
    reply = http.post("/v1/embeddings", json={"model": MODEL, **body})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    vectors = np.asarray([item["embedding"] for item in answer["data"]], dtype=np.float32)
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"]
    return vectors, answer["usage"]["total_tokens"]


def _error(reply: httpx.Response, param: str) -> str:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    message: str = error["message"]
    return message


def _tokens(model: Any, texts: list[str], **options: Any) -> int:
    return sum(len(ids) for ids in model.tokenizer(texts, **options)["input_ids"])


def _assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


# -- prompts --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(PROMPTED_MODELS))
@pytest.mark.parametrize(
    ("fields", "prompt_name"),
    [
        ({"input_type": "query"}, "query"),
        ({"input_type": "search_query"}, "query"),
        # "document" is empty in sentence-transformers' defaults: the role takes "passage".
        ({"input_type": "document"}, "passage"),
        ({"input_type": "search_document"}, "passage"),
        ({"input_type": "classification"}, "classification"),
        ({"prompt_name": "passage"}, "passage"),
        ({"prompt_name": "query", "input_type": "document"}, "query"),  # the name wins
    ],
)
def test_a_prompt_gives_the_reference_vectors_and_counts_its_tokens(
    http: httpx.Client,
    prompted_reference: dict[str, Any],
    model: str,
    fields: dict[str, str],
    prompt_name: str,
) -> None:
    reference = prompted_reference[model]
    got, tokens = _embed(http, model=model, input=TEXTS, **fields)
    want = reference.encode(TEXTS, prompt_name=prompt_name, normalize_embeddings=True)
    _assert_identical(got, want)
    prompt = reference.prompts[prompt_name]
    assert tokens == _tokens(reference, [prompt + text for text in TEXTS])


def test_a_prompt_from_the_settings_is_served(
    http: httpx.Client, prompted_reference: dict[str, Any]
) -> None:
    reference = prompted_reference["prompted"]
    assert MODEL_OPTIONS["prompted"]["prompts"] == {"clustering": "cluster: "}
    assert MODEL_OPTIONS["prompted"]["long_text_window_tokens"] == LONG_WINDOW_TOKENS
    got, _ = _embed(http, model="prompted", input=TEXTS, input_type="clustering")
    _assert_identical(got, reference.encode(TEXTS, prompt_name="clustering"))
    got, _ = _embed(http, model="prompt-apart", input=TEXTS, input_type="clustering")
    plain, _ = _embed(http, model="prompt-apart", input=TEXTS)
    _assert_identical(got, plain)  # no clustering prompt there: as without one


def test_the_bundled_model_takes_every_input_type_and_changes_nothing(
    http: httpx.Client, reference_model: Any
) -> None:
    plain, plain_tokens = _embed(http, input=TEXTS)
    for input_type in ("query", "document", "search_query", "classification", "clustering"):
        got, tokens = _embed(http, input=TEXTS, input_type=input_type)
        np.testing.assert_array_equal(got, plain)
        assert tokens == plain_tokens
    _assert_identical(plain, reference_vectors(reference_model, TEXTS))


def test_the_prompt_is_part_of_the_cache_key(http: httpx.Client) -> None:
    """A model that pools over its prompt: "query: " + text IS the text "query: text" (one
    entry). One that leaves the prompt out: they differ, and so do their entries."""
    text = "a text only this test embeds"
    for model, pooled in PROMPTED_MODELS.items():
        first = http.post(
            "/embed", json={"model": model, "text": text, "input_type": "query"}
        ).json()
        assert first["cached"] is False
        spelled_out = http.post("/embed", json={"model": model, "text": "query: " + text}).json()
        assert spelled_out["cached"] is pooled
        same = np.allclose(first["embedding"], spelled_out["embedding"], atol=1e-6)
        assert same is pooled
        again = http.post(
            "/embed/batch", json={"model": model, "texts": [text], "input_type": "query"}
        ).json()
        assert again["cached_count"] == 1
        np.testing.assert_array_equal(again["embeddings"][0], first["embedding"])


def test_the_openai_sdk_sends_them_through_extra_body(
    prompts_server: ServerProcess, prompted_reference: dict[str, Any]
) -> None:
    with OpenAI(base_url=f"{prompts_server.url}/v1", api_key="unused", max_retries=0) as sdk:
        response = sdk.embeddings.create(
            model="prompt-apart", input=TEXTS, extra_body={"input_type": "query"}
        )
    got = np.asarray([item.embedding for item in response.data], dtype=np.float32)
    want = prompted_reference["prompt-apart"].encode(TEXTS, prompt_name="query")
    _assert_identical(got, want)


def test_unknown_prompts_and_input_types_are_400s(http: httpx.Client) -> None:
    reply = http.post(
        "/v1/embeddings", json={"model": "prompted", "input": "x", "prompt_name": "nope"}
    )
    assert "query" in _error(reply, "prompt_name")  # it names the prompts there are
    reply = http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "prompt_name": "x"})
    _error(reply, "prompt_name")
    reply = http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "input_type": "q"})
    _error(reply, "input_type")
    reply = http.post("/embed", json={"text": "x", "input_type": "passage"})
    _error(reply, "input_type")


# -- truncation -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["a few windows", "huge"])
def test_left_truncation_keeps_the_end_as_the_reference_does(
    http: httpx.Client, reference_model: Any, size: str
) -> None:
    # A huge text is cut before it is tokenized, and must still give the reference's vector.
    text = LONG_TEXT if size == "a few windows" else LONG_TEXT * 200
    right, right_tokens = _embed(http, input=[text, "short"])
    left, left_tokens = _embed(http, input=[text, "short"], truncation_direction="left")
    tokenizer = reference_model.tokenizer
    tokenizer.truncation_side = "left"
    try:
        want_left = reference_vectors(reference_model, [text, "short"])
    finally:
        tokenizer.truncation_side = "right"
    _assert_identical(left, want_left)
    _assert_identical(right, reference_vectors(reference_model, [text, "short"]))
    assert float(left[0] @ right[0]) < 0.99  # really the other end
    np.testing.assert_array_equal(left[1], right[1])
    assert left_tokens == right_tokens == 256 + _tokens(reference_model, ["short"])


def test_left_truncation_with_a_prompt_matches_the_reference(
    http: httpx.Client, prompted_reference: dict[str, Any]
) -> None:
    for model in PROMPTED_MODELS:
        reference = prompted_reference[model]
        got, _ = _embed(
            http, model=model, input=[LONG_TEXT], input_type="query", truncation_direction="left"
        )
        reference.tokenizer.truncation_side = "left"
        try:
            want = reference.encode([LONG_TEXT], prompt_name="query")
        finally:
            reference.tokenizer.truncation_side = "right"
        _assert_identical(got, want)


def test_truncate_false_refuses_an_input_over_the_window(
    http: httpx.Client, reference_model: Any
) -> None:
    fits = "a short text"
    _embed(http, input=[fits], truncate=False)
    for text in (LONG_TEXT, LONG_TEXT * 200):
        reply = http.post(
            "/v1/embeddings", json={"model": MODEL, "input": [fits, text], "truncate": False}
        )
        message = _error(reply, "input")
        count = _tokens(reference_model, [text])
        assert f"'input[1]' has {count} tokens" in message and "256" in message, message
    # Exactly at the window: accepted. 254 words of one token each, plus [CLS] and [SEP].
    exact = " ".join(["word"] * 254)
    assert _tokens(reference_model, [exact]) == 256
    _embed(http, input=exact, truncate=False)
    over = exact + " word"
    _error(
        http.post("/v1/embeddings", json={"model": MODEL, "input": over, "truncate": False}),
        "input",
    )


@pytest.mark.parametrize("value", ["false", 0, None, "no"])
def test_truncate_must_be_a_json_boolean(http: httpx.Client, value: Any) -> None:
    reply = http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "truncate": value})
    _error(reply, "truncate")


# -- long texts -----------------------------------------------------------------------------


def _weighted_mean(reference: Any, windows: list[str], prompt: str = "") -> tuple[np.ndarray, int]:
    vectors = reference.encode([prompt + window for window in windows], normalize_embeddings=True)
    weights = np.asarray(
        [len(ids) for ids in reference.tokenizer([prompt + w for w in windows])["input_ids"]]
    )
    mean = (vectors * weights[:, None]).sum(axis=0)
    return mean / np.linalg.norm(mean), int(weights.sum())


def test_long_text_mean_is_the_weighted_mean_of_the_reference_windows(
    http: httpx.Client, reference_model: Any
) -> None:
    overlap = ModelOptions().long_text_overlap_tokens  # the default, as the bundled model has
    tokenizer = TextTokenizer(
        plain_copy(reference_model.tokenizer.backend_tokenizer), 256, overlap_tokens=overlap
    )
    windows = tokenizer.windows(LONG_TEXT)
    assert len(windows) >= 3
    want, want_tokens = _weighted_mean(reference_model, windows)
    got, tokens = _embed(http, input=[LONG_TEXT, "short"], long_text="mean")
    _assert_identical(got[0], want)
    assert tokens == want_tokens + _tokens(reference_model, ["short"])
    # A text within the window is itself.
    _assert_identical(got[1], reference_vectors(reference_model, ["short"])[0])
    # Each window was cached on its own: an ordinary text now.
    cached = http.post("/embed/batch", json={"texts": windows}).json()
    assert cached["cached_count"] == len(windows)


def test_long_text_mean_with_a_prompt_and_windows_from_the_settings(
    http: httpx.Client, prompted_reference: dict[str, Any]
) -> None:
    reference = prompted_reference["prompted"]
    tokenizer = TextTokenizer(
        plain_copy(reference.tokenizer.backend_tokenizer),
        256,
        window_tokens=LONG_WINDOW_TOKENS,
        overlap_tokens=LONG_OVERLAP_TOKENS,
    )
    windows = tokenizer.windows(LONG_TEXT, "query: ")
    assert len(windows) > 10  # windows of 64 tokens
    want, want_tokens = _weighted_mean(reference, windows, "query: ")
    got, tokens = _embed(
        http, model="prompted", input=LONG_TEXT, input_type="query", long_text="mean"
    )
    _assert_identical(got[0], want)
    assert tokens == want_tokens


def test_long_text_past_its_limit_and_on_an_upstream_model_are_400s(http: httpx.Client) -> None:
    huge = "word " * (MAX_INPUT_TOKENS_LONG + 10)
    message = _error(
        http.post("/v1/embeddings", json={"model": MODEL, "input": huge, "long_text": "mean"}),
        "input",
    )
    assert str(MAX_INPUT_TOKENS_LONG) in message
    reply = http.post("/v1/embeddings", json={"model": "small", "input": "x", "long_text": "mean"})
    _error(reply, "long_text")
    reply = http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "long_text": "max"})
    _error(reply, "long_text")


# -- every path: Batch API lines --------------------------------------------------------------


def test_batch_lines_get_what_the_same_requests_get_online(
    http: httpx.Client, prompts_server: ServerProcess
) -> None:
    """Lines go through the same operation: the same vectors and usage as online, and the
    same 400s in the error file."""
    good: dict[str, dict[str, Any]] = {
        "query": {"model": "prompt-apart", "input": TEXTS, "input_type": "query"},
        "left": {"model": MODEL, "input": LONG_TEXT, "truncation_direction": "left"},
        "mean": {"model": "prompted", "input": [LONG_TEXT], "long_text": "mean"},
    }
    bad: dict[str, tuple[dict[str, Any], str]] = {
        "over": ({"model": MODEL, "input": LONG_TEXT, "truncate": False}, "input"),
        "name": ({"model": "prompted", "input": "x", "prompt_name": "nope"}, "prompt_name"),
        "type": ({"model": MODEL, "input": "x", "input_type": "nope"}, "input_type"),
        "strict": ({"model": MODEL, "input": "x", "truncate": "false"}, "truncate"),
    }
    lines = [request_line(key, **body) for key, body in good.items()]
    lines += [request_line(key, **body) for key, (body, _) in bad.items()]
    with OpenAI(base_url=f"{prompts_server.url}/v1", api_key="unused", max_retries=0) as sdk:
        batch = submit(sdk, lines)
        done = wait_for(sdk, batch.id, ("completed", "failed"), timeout=180)
        assert done.status == "completed"
        answered = {line["custom_id"]: line for line in read_lines(sdk, done.output_file_id)}
        failed = {line["custom_id"]: line for line in read_lines(sdk, done.error_file_id)}
    assert set(answered) == set(good) and set(failed) == set(bad)
    for key, body in good.items():
        online = http.post("/v1/embeddings", json=body).json()
        line = answered[key]["response"]["body"]
        assert line["usage"] == online["usage"]
        _assert_identical(
            np.asarray([item["embedding"] for item in line["data"]], dtype=np.float32),
            np.asarray([item["embedding"] for item in online["data"]], dtype=np.float32),
        )
    for key, (_, param) in bad.items():
        response = failed[key]["response"]
        assert response["status_code"] == 400
        assert response["body"]["error"]["param"] == param


# -- every path: embedpipe embed ----------------------------------------------------------------


def test_embed_cli_takes_input_type_and_long_text_in_process_and_on_a_server(
    tmp_path: Path,
    http: httpx.Client,
    prompts_server: ServerProcess,
    prompted_model_dirs: dict[str, Path],
    prompted_reference: dict[str, Any],
) -> None:
    texts = ["what is a vector?", LONG_TEXT]
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    flags = ["--input-type", "query", "--long-text", "mean", "-q"]
    model_dir = str(prompted_model_dirs["prompted"])
    embed_cli(tmp_path, str(source), "-o", "local.npy", "--model", model_dir, *flags)
    _, local = read_output(tmp_path / "local.npy")
    reference = prompted_reference["prompted"]
    _assert_identical(local[0], reference.encode(texts[0], prompt_name="query"))
    # In process the model has the default long-text windows (no EMBEDPIPE_MODEL_OPTIONS).
    overlap = ModelOptions().long_text_overlap_tokens
    windows = TextTokenizer(
        plain_copy(reference.tokenizer.backend_tokenizer), 256, overlap_tokens=overlap
    )
    want, _ = _weighted_mean(reference, windows.windows(LONG_TEXT, "query: "), "query: ")
    _assert_identical(local[1], want)

    server = ["--server", prompts_server.url, "--model", "prompted"]
    embed_cli(tmp_path, str(source), "-o", "remote.npy", *server, *flags)
    _, remote = read_output(tmp_path / "remote.npy")
    online, _ = _embed(http, model="prompted", input=texts, input_type="query", long_text="mean")
    _assert_identical(remote, online)


def test_cosine_rerank_puts_the_query_and_documents_behind_their_prompts(
    http: httpx.Client, prompted_reference: dict[str, Any]
) -> None:
    """Rerank with an embedding model that has prompts: the query in its "query" prompt, the
    documents in their "passage" prompt, as the reference library embeds them; a model that
    keeps its prompt apart from pooling ranks the plain texts."""
    query, documents = "what is an embedding?", [TEXTS[1], "Bread needs flour and water.", TEXTS[0]]
    for model, prompted in PROMPTED_MODELS.items():
        reply = http.post(
            "/v2/rerank", json={"model": model, "query": query, "documents": documents}
        )
        assert reply.status_code == 200, reply.text
        scores = {item["index"]: item["relevance_score"] for item in reply.json()["results"]}
        reference = prompted_reference[model]
        if prompted:
            want_query = reference.encode([query], prompt_name="query", normalize_embeddings=True)
            want_docs = reference.encode(
                documents, prompt_name="passage", normalize_embeddings=True
            )
        else:
            want_query = reference.encode([query], prompt="", normalize_embeddings=True)
            want_docs = reference.encode(documents, prompt="", normalize_embeddings=True)
        want = (want_docs @ want_query[0]).tolist()
        np.testing.assert_allclose([scores[i] for i in range(len(documents))], want, atol=1e-5)
