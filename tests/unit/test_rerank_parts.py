"""The small parts of reranking: a pair as one string, the cross-encoder spec, which routes a
model serves, and the rerank operation's validation and ranking over a fake model."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpipe.embedders.pairs import pair_text, split_pair
from embedpipe.embedders.registry import ModelRegistry, ModelSpec, parse_model_specs
from embedpipe.errors import InvalidInput, ModelNotFound
from embedpipe.operations.rerank import prepare, rank
from embedpipe.settings import LimitsSettings, Settings
from tests.fakes import FakeEmbedder, fake_app


@pytest.mark.parametrize(
    ("query", "document"),
    [("ab", "c"), ("a", "bc"), ("", "x"), ("3:abc", ""), ("q:u:e", "d:o:c"), ("é🙂", "ü")],
)
def test_a_pair_round_trips_and_differs_from_every_other_split(query: str, document: str) -> None:
    text = pair_text(query, document)
    assert split_pair(text) == (query, document)
    joined = query + document
    others = {pair_text(joined[:cut], joined[cut:]) for cut in range(len(joined) + 1)}
    assert len(others) == len(joined) + 1  # each split its own key


@pytest.mark.parametrize("text", ["no prefix", "x:abc", "9:short", ":abc", "-1:abc"])
def test_a_string_that_is_no_pair_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="pair"):
        split_pair(text)


def test_extra_models_take_a_cross_encoder_directory() -> None:
    specs = parse_model_specs("all-MiniLM-L6-v2", "ranker=cross-encoder:/models/ms-marco")
    assert specs[1] == ModelSpec(name="ranker", source="/models/ms-marco", backend="cross-encoder")


def _registry() -> ModelRegistry:
    registry = ModelRegistry()
    registry.add(ModelSpec(name="embedder", source="memory"), FakeEmbedder("embedder"))
    return registry


def test_an_embedding_model_serves_embeddings_and_rerank() -> None:
    registry = _registry()
    assert registry.resolve_for("embedder", "/v1/embeddings") == "embedder"
    assert registry.resolve_for("embedder", "/v1/rerank") == "embedder"
    with pytest.raises(ModelNotFound):
        registry.resolve_for("nope", "/v1/rerank")


async def test_cosine_ranking_and_validation_over_a_fake_model(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    _, runtime = fake_app(settings)
    service, limits = runtime.service, LimitsSettings(max_rerank_documents=3)
    try:
        model = runtime.default_model
        documents = ["alpha", {"text": "beta"}, "gamma"]
        prepared = prepare(
            service, limits, model=model, route="/v1/rerank", query="alpha", documents=documents
        )
        assert prepared.inputs == ["alpha", "alpha", "beta", "gamma"]
        ranked = rank(service, prepared, await service.embed(model, prepared.inputs), raw=False)
        assert ranked.order[0] == 0 and ranked.scores[0] == pytest.approx(1.0, abs=1e-6)
        assert ranked.scores == sorted(ranked.scores, reverse=True)
        cases: list[tuple[object, object, int | None, str]] = [
            ("q", ["a"] * 4, None, "documents"),
            ("   ", [], None, "documents"),
            ("q", ["a"], 0, "top_n"),
            (3, ["a"], None, "query"),
        ]
        for query, docs, top_n, param in cases:
            with pytest.raises(InvalidInput) as refused:
                prepare(
                    service,
                    limits,
                    model=model,
                    route="/v1/rerank",
                    query=query,
                    documents=docs,
                    top_n=top_n,
                )
            assert refused.value.param == param
    finally:
        await runtime.close()
