"""Which prompt a request gets: ``prompt_name`` first, then ``input_type``'s role, then the
model's default; and what a model without prompts does with them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from embedpipe.embedders import ModelSpec
from embedpipe.embedders.base import TextForm
from embedpipe.embedders.prompts import INPUT_TYPES, ModelPrompts, merged_prompts
from embedpipe.errors import InvalidInput
from embedpipe.settings import Settings
from embedpipe.upstream import describe_upstream

E5 = ModelPrompts({"query": "query: ", "passage": "passage: ", "document": ""})


@pytest.mark.parametrize(
    ("input_type", "prompt"),
    [
        ("query", "query: "),
        ("search_query", "query: "),
        ("document", "passage: "),  # "document" is empty: the next name of the role
        ("search_document", "passage: "),
        ("classification", ""),  # the model has none: no prompt
        ("clustering", ""),
    ],
)
def test_input_types_map_to_the_models_prompts(input_type: str, prompt: str) -> None:
    assert E5.resolve(input_type) == prompt


def test_prompt_name_wins_and_the_default_applies_when_nothing_is_named() -> None:
    prompts = ModelPrompts({"query": "q: ", "doc": "d: "}, default_prompt_name="doc")
    assert prompts.resolve("query", "doc") == "d: "
    assert prompts.resolve() == "d: "
    assert prompts.resolve("query") == "q: "
    assert ModelPrompts().resolve() == ""


def test_a_model_without_prompts_takes_every_input_type() -> None:
    assert {ModelPrompts().resolve(name) for name in INPUT_TYPES} == {""}


def test_unknown_names_are_400s_on_their_param() -> None:
    with pytest.raises(InvalidInput) as unknown:
        E5.resolve(prompt_name="nope")
    assert unknown.value.param == "prompt_name" and "passage" in unknown.value.message
    with pytest.raises(InvalidInput) as bad_type:
        E5.resolve("passage")  # a prompt name, not an input type
    assert bad_type.value.param == "input_type"


def test_settings_win_over_the_models_own_prompts() -> None:
    merged = merged_prompts(
        {"query": None, "document": "d: "}, None, {"query": "q: "}, "query", in_pooling=False
    )
    assert merged.prompts == {"query": "q: ", "document": "d: "}
    assert merged.resolve() == "q: " and merged.in_pooling is False
    with pytest.raises(InvalidInput):
        merged_prompts({}, "missing", {}, None, in_pooling=True)


def test_each_form_has_its_own_key_and_the_plain_form_keeps_the_old_ones() -> None:
    suffixes = [
        TextForm().key_suffix,
        TextForm("q: ").key_suffix,
        TextForm("d: ").key_suffix,
        TextForm(truncation="left").key_suffix,
        TextForm("q: ", "left").key_suffix,
    ]
    assert suffixes[0] == ""
    assert len(set(suffixes)) == len(suffixes)


def test_an_upstream_model_takes_its_prompts_from_the_settings(tmp_path: Path) -> None:
    """Prepended to its texts (an upstream's pooling sees them): its cache key is the text's."""
    settings = Settings(
        data_dir=tmp_path, model_options={"small": {"prompts": {"query": "query: "}}}
    )
    spec = ModelSpec(name="small", source="text-embedding-3-small", backend="openai")
    prompts = describe_upstream(spec, settings).prompts
    assert prompts.resolve("search_query") == "query: " and prompts.in_pooling
    plain = describe_upstream(replace(spec, name="other"), settings).prompts
    assert plain.resolve("query") == ""
