"""Rerank against a real server process with the test cross-encoder: reference scores (the
library's own ``CrossEncoder.predict`` and the bundled model's cosine), the cache, and the
clients that speak Cohere's, Jina's and TEI's shapes, unmodified."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cross_encoder import CROSS_ENCODER
from tests.integration.conftest import MODEL, reference_vectors
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

QUERY = "How do vaccines train the immune system?"
DOCUMENTS = [
    "Vaccines expose the immune system to a harmless piece of a pathogen.",
    "The stock market closed higher on Friday.",
    "Antibodies are produced after vaccination and remember the pathogen.",
    "short",
    "A recipe for banana bread with walnuts and cinnamon. " * 8,
    # Longer than the model's window (512 tokens): cut as the library cuts it.
    "Immune memory lets the body respond faster on a second exposure. " * 60,
]


def _predict(reference: Any, query: str, documents: list[str], **kwargs: Any) -> np.ndarray:
    scores: np.ndarray = reference.predict(
        [(query, document) for document in documents], show_progress_bar=False, **kwargs
    )
    return scores


def _assert_ranked(results: list[tuple[int, float]], want: np.ndarray) -> None:
    """``results`` (index, score) hold every document, best first, at the reference scores."""
    assert sorted(index for index, _ in results) == list(range(len(want)))
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)
    for index, score in results:
        assert abs(score - float(want[index])) <= 1e-5, (index, score, want[index])


def _embeddings_served(server: ServerProcess, model: str) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        sample.labels["source"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "embedpipe_embeddings_total" and sample.labels.get("model") == model
    }


def test_cohere_sdk_v2_rerank_matches_cross_encoder_predict(
    rerank_server: ServerProcess, reference_cross_encoder: Any
) -> None:
    import cohere

    with httpx.Client(timeout=60) as http:
        client = cohere.ClientV2(api_key="unused", base_url=rerank_server.url, httpx_client=http)
        response = client.rerank(model=CROSS_ENCODER, query=QUERY, documents=DOCUMENTS)
        top = client.rerank(model=CROSS_ENCODER, query=QUERY, documents=DOCUMENTS, top_n=2)
    want = _predict(reference_cross_encoder, QUERY, DOCUMENTS)
    _assert_ranked([(r.index, r.relevance_score) for r in response.results], want)
    assert response.id and response.meta is not None and response.meta.billed_units is not None
    assert response.meta.billed_units.search_units == 1
    assert [r.index for r in top.results] == [r.index for r in response.results[:2]]


def test_max_tokens_per_doc_scores_each_documents_first_tokens(
    rerank_server: ServerProcess, reference_cross_encoder: Any
) -> None:
    import cohere

    with httpx.Client(timeout=60) as http:
        client = cohere.ClientV2(api_key="unused", base_url=rerank_server.url, httpx_client=http)
        response = client.rerank(
            model=CROSS_ENCODER, query=QUERY, documents=DOCUMENTS, max_tokens_per_doc=8
        )
    tokenizer = reference_cross_encoder.tokenizer
    cut = []
    for text in DOCUMENTS:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        cut.append(text[: offsets[7][1]] if len(offsets) > 8 else text)
    assert cut != DOCUMENTS
    want = _predict(reference_cross_encoder, QUERY, cut)
    _assert_ranked([(r.index, r.relevance_score) for r in response.results], want)


def test_jina_request_with_httpx_objects_documents_and_usage(
    rerank_server: ServerProcess, reference_cross_encoder: Any
) -> None:
    documents = [{"text": text} for text in DOCUMENTS[:4]]
    reply = httpx.post(
        f"{rerank_server.url}/v1/rerank",
        json={
            "model": CROSS_ENCODER,
            "query": QUERY,
            "documents": documents,
            "top_n": 3,
            "return_documents": True,
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == CROSS_ENCODER and len(body["results"]) == 3
    want = _predict(reference_cross_encoder, QUERY, DOCUMENTS[:4])
    best = np.argsort(-want, kind="stable")[:3]
    assert [item["index"] for item in body["results"]] == best.tolist()
    for item in body["results"]:
        assert item["document"] == {"text": DOCUMENTS[item["index"]]}
        assert abs(item["relevance_score"] - want[item["index"]]) <= 1e-5
    tokenizer = reference_cross_encoder.tokenizer
    pair_tokens = [
        len(tokenizer(QUERY, text, truncation=True, max_length=512)["input_ids"])
        for text in DOCUMENTS[:4]
    ]
    assert body["usage"]["total_tokens"] == sum(pair_tokens)


async def test_scores_match_predict_whatever_the_batch_grouping(
    rerank_server: ServerProcess, reference_cross_encoder: Any
) -> None:
    """Concurrent requests whose pairs the batcher groups by length, with a query and
    documents both longer than the window (the library then splits the window)."""
    long_query = "What does the immune system remember after an infection? " * 70
    requests = [
        (f"{QUERY} variant {n}", [*DOCUMENTS[n % 3 :], f"document {n} " * (5 + 40 * n)])
        for n in range(6)
    ]
    requests.append((long_query, [*DOCUMENTS[4:], "tiny", "Immune cells " * 200]))
    async with httpx.AsyncClient(base_url=rerank_server.url, timeout=120) as http:
        replies = await asyncio.gather(
            *(
                http.post(
                    "/v2/rerank",
                    json={"model": CROSS_ENCODER, "query": query, "documents": documents},
                )
                for query, documents in requests
            )
        )
    for (query, documents), reply in zip(requests, replies, strict=True):
        assert reply.status_code == 200, reply.text
        want = _predict(reference_cross_encoder, query, documents)
        _assert_ranked(
            [(item["index"], item["relevance_score"]) for item in reply.json()["results"]], want
        )


def test_repeated_query_is_served_from_the_cache(rerank_server: ServerProcess) -> None:
    documents = [f"A document about caching number {n}." for n in range(5)]
    payload = {"model": CROSS_ENCODER, "query": "what is cached?", "documents": documents}
    before = _embeddings_served(rerank_server, CROSS_ENCODER)
    first = httpx.post(f"{rerank_server.url}/v1/rerank", json=payload, timeout=60)
    middle = _embeddings_served(rerank_server, CROSS_ENCODER)
    second = httpx.post(f"{rerank_server.url}/v1/rerank", json=payload, timeout=60)
    after = _embeddings_served(rerank_server, CROSS_ENCODER)
    assert first.status_code == second.status_code == 200
    assert middle["computed"] - before["computed"] == 5
    assert after["computed"] == middle["computed"]  # computed nothing
    assert after["l1"] - middle["l1"] == 5
    assert first.json()["results"] == second.json()["results"]


async def test_cosine_rerank_with_the_embedding_model_reuses_cached_vectors(
    rerank_server: ServerProcess, reference_model: Any
) -> None:
    documents = [f"Embedded corpus passage {n} about vaccines and immunity." for n in range(4)]
    async with httpx.AsyncClient(base_url=rerank_server.url, timeout=60) as http:
        embedded = await http.post("/v1/embeddings", json={"model": MODEL, "input": documents})
        assert embedded.status_code == 200
        before = _embeddings_served(rerank_server, MODEL)
        reply = await http.post(
            "/v1/rerank", json={"model": MODEL, "query": QUERY, "documents": documents}
        )
    after = _embeddings_served(rerank_server, MODEL)
    assert reply.status_code == 200, reply.text
    assert after["computed"] - before["computed"] == 1  # the query only
    vectors = reference_vectors(reference_model, [QUERY, *documents])
    want = vectors[1:] @ vectors[0]
    _assert_ranked(
        [(item["index"], item["relevance_score"]) for item in reply.json()["results"]], want
    )


def test_tei_rerank_scores_raw_scores_and_texts(
    rerank_server: ServerProcess, reference_cross_encoder: Any
) -> None:
    import torch

    texts = DOCUMENTS[:3]
    payload = {"query": QUERY, "texts": texts, "return_text": True}
    scored = httpx.post(f"{rerank_server.url}/rerank", json=payload, timeout=60)
    raw = httpx.post(
        f"{rerank_server.url}/rerank", json={**payload, "raw_scores": True}, timeout=60
    )
    assert scored.status_code == raw.status_code == 200, scored.text
    want = _predict(reference_cross_encoder, QUERY, texts)
    logits = _predict(reference_cross_encoder, QUERY, texts, activation_fn=torch.nn.Identity())
    _assert_ranked([(item["index"], item["score"]) for item in scored.json()], want)
    _assert_ranked([(item["index"], item["score"]) for item in raw.json()], logits)
    assert all(item["text"] == texts[item["index"]] for item in scored.json())


# The integrations build their own Cohere client from base_url and never close it: its
# socket's ResourceWarning is collected here rather than in whichever test runs next.
_UNCLOSED_CLIENT = pytest.mark.filterwarnings("ignore::ResourceWarning")


@_UNCLOSED_CLIENT
def test_langchain_cohere_rerank(
    rerank_server: ServerProcess, reference_cross_encoder: Any
) -> None:
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document
    from pydantic import SecretStr

    reranker = CohereRerank(
        model=CROSS_ENCODER,
        cohere_api_key=SecretStr("unused"),
        base_url=rerank_server.url,
        top_n=3,
    )
    ranked = reranker.compress_documents([Document(page_content=text) for text in DOCUMENTS], QUERY)
    want = _predict(reference_cross_encoder, QUERY, DOCUMENTS)
    assert [doc.page_content for doc in ranked] == [
        DOCUMENTS[i] for i in np.argsort(-want, kind="stable")[:3]
    ]
    for doc in ranked:
        index = DOCUMENTS.index(doc.page_content)
        assert abs(doc.metadata["relevance_score"] - want[index]) <= 1e-5
    del reranker
    gc.collect()


@_UNCLOSED_CLIENT
def test_llamaindex_cohere_rerank(
    rerank_server: ServerProcess, reference_cross_encoder: Any
) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    reranker = CohereRerank(
        api_key="unused", model=CROSS_ENCODER, top_n=2, base_url=rerank_server.url
    )
    nodes = [NodeWithScore(node=TextNode(text=text)) for text in DOCUMENTS]
    ranked = reranker.postprocess_nodes(nodes, QueryBundle(QUERY))
    want = _predict(reference_cross_encoder, QUERY, DOCUMENTS)
    best = np.argsort(-want, kind="stable")[:2]
    assert [node.node.get_content() for node in ranked] == [DOCUMENTS[i] for i in best]
    assert [node.score for node in ranked] == pytest.approx(want[best].tolist(), abs=1e-5)
    del reranker
    gc.collect()


def test_models_say_what_each_model_serves(rerank_server: ServerProcess) -> None:
    models = httpx.get(f"{rerank_server.url}/v1/models", timeout=10).json()["data"]
    by_id = {model["id"]: model for model in models}
    assert by_id[CROSS_ENCODER]["capabilities"] == ["rerank"]
    assert "/v1/embeddings" not in by_id[CROSS_ENCODER]["endpoints"]
    assert by_id[MODEL]["capabilities"] == ["embeddings", "rerank"]
    assert {"/v1/embeddings", "/v1/rerank"} <= set(by_id[MODEL]["endpoints"])


def test_batch_lines_rerank_like_the_route(
    rerank_server: ServerProcess, reference_cross_encoder: Any
) -> None:
    from openai import OpenAI

    from tests.integration.batch_helpers import read_lines, wait_for

    lines = [
        {"custom_id": f"q-{n}", "method": "POST", "url": "/v1/rerank", "body": body}
        for n, body in enumerate(
            [
                {"model": CROSS_ENCODER, "query": QUERY, "documents": DOCUMENTS, "top_n": 2},
                {"model": MODEL, "query": QUERY, "documents": DOCUMENTS[:3]},
                {"model": CROSS_ENCODER, "query": "", "documents": DOCUMENTS},
            ]
        )
    ]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    with OpenAI(base_url=f"{rerank_server.url}/v1", api_key="unused", max_retries=0) as client:
        upload = client.files.create(file=("rerank.jsonl", content), purpose="batch")
        # The SDK's endpoint type lists OpenAI's endpoints only: the request is the same.
        created = httpx.post(
            f"{rerank_server.url}/v1/batches",
            json={"input_file_id": upload.id, "endpoint": "/v1/rerank", "completion_window": "24h"},
            timeout=30,
        )
        assert created.status_code == 200, created.text
        assert created.json()["endpoint"] == "/v1/rerank"
        done = wait_for(client, created.json()["id"], ("completed", "failed"), timeout=180)
        assert done.status == "completed", done
        output = {line["custom_id"]: line for line in read_lines(client, done.output_file_id)}
        errors = read_lines(client, done.error_file_id)
    want = _predict(reference_cross_encoder, QUERY, DOCUMENTS)
    results = output["q-0"]["response"]["body"]["results"]
    assert [item["index"] for item in results] == np.argsort(-want, kind="stable")[:2].tolist()
    for item in results:
        assert abs(item["relevance_score"] - want[item["index"]]) <= 1e-5
    assert len(output["q-1"]["response"]["body"]["results"]) == 3
    assert [line["custom_id"] for line in errors] == ["q-2"]
    assert errors[0]["response"]["status_code"] == 400


def test_the_cli_prints_the_ranking(
    tmp_path: Path, cross_encoder_dir: Path, reference_cross_encoder: Any
) -> None:
    documents = DOCUMENTS[:4]
    (tmp_path / "docs.txt").write_text("\n".join(documents) + "\n\n", encoding="utf-8")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EMBEDPIPE_DATA_DIR": str(tmp_path / "data"),
        "EMBEDPIPE_MODEL_THREADS": "1",
        "EMBEDPIPE_REDIS_URL": "",
        "EMBEDPIPE_EXTRA_MODELS": f"{CROSS_ENCODER}=cross-encoder:{cross_encoder_dir}",
        "COLUMNS": "400",
    }
    command = [sys.executable, "-m", "embedpipe", "rerank", QUERY, "docs.txt", "--top-n", "3"]
    result = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    want = _predict(reference_cross_encoder, QUERY, documents)
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    printed = [[cell.strip() for cell in row.strip("│").split("│")] for row in rows]
    assert [int(row[1]) - 1 for row in printed] == np.argsort(-want, kind="stable")[:3].tolist()
    for row in printed:
        assert abs(float(row[2]) - want[int(row[1]) - 1]) <= 1e-4
        assert row[3] == documents[int(row[1]) - 1]

    empty = subprocess.run(
        [*command[:4], "", "docs.txt"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert empty.returncode == 2 and "'query' must not be empty" in empty.stderr


async def test_scores_stay_exact_with_a_float16_vector_cache(
    tmp_path: Path, cross_encoder_dir: Path, reference_cross_encoder: Any
) -> None:
    from embedpipe.operations.rerank import prepare, rank
    from embedpipe.runtime import Runtime
    from embedpipe.settings import CacheSettings, Settings

    settings = Settings(
        data_dir=tmp_path / "data",
        model_threads=1,
        extra_models=f"{CROSS_ENCODER}=cross-encoder:{cross_encoder_dir}",
        cache=CacheSettings(store_dtype="float16"),
    )
    runtime = await Runtime.open(settings)
    try:
        service = runtime.service
        prepared = prepare(
            service,
            settings.limits,
            model=CROSS_ENCODER,
            route="/v1/rerank",
            query=QUERY,
            documents=DOCUMENTS,
        )
        want = _predict(reference_cross_encoder, QUERY, DOCUMENTS)
        for expected_source in ("computed", "l1"):
            result = await service.embed(prepared.model, prepared.inputs)
            assert set(result.sources) == {expected_source}
            ranked = rank(service, prepared, result, raw=False)
            _assert_ranked(list(zip(ranked.order, ranked.scores, strict=True)), want)
    finally:
        await runtime.close()
