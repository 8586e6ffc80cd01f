"""A model's prompts, and which one a request's ``input_type`` or ``prompt_name`` picks.

Prompts come from the model's sentence-transformers config (``prompts`` and
``default_prompt_name`` in ``config_sentence_transformers.json``), overridden per model by
``EMBEDPIPE_MODEL_OPTIONS``. ``input_type`` names a role, not a prompt; each role tries prompt
names in order and takes the first the model has, as sentence-transformers' ``encode_query``
and ``encode_document`` do:

=================================  =====================================
input_type                         prompt names tried, in order
=================================  =====================================
``query``, ``search_query``        ``query``, ``search_query``
``document``, ``search_document``  ``document``, ``passage``, ``corpus``, ``search_document``
``classification``                 ``classification``
``clustering``                     ``clustering``
=================================  =====================================

A role whose names the model lacks (or maps to an empty prompt) gets no prompt: a model
without prompts accepts every ``input_type`` and answers as without one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from embedpipe.errors import InvalidInput

InputType = Literal[
    "query",
    "document",
    "search_query",
    "search_document",
    "classification",
    "clustering",
]
INPUT_TYPES: tuple[str, ...] = get_args(InputType)

_PROMPT_NAMES_OF: dict[str, tuple[str, ...]] = {
    "query": ("query", "search_query"),
    "search_query": ("query", "search_query"),
    "document": ("document", "passage", "corpus", "search_document"),
    "search_document": ("document", "passage", "corpus", "search_document"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


@dataclass(frozen=True, slots=True)
class ModelPrompts:
    """``prompts``: name -> text. ``in_pooling``: whether the model pools over the prompt's
    tokens too (sentence-transformers' ``include_prompt``, true for almost every model). Then
    prompt + text is exactly the text "prompt + text", and is embedded (and cached) as such;
    otherwise the prompt travels beside the text."""

    prompts: Mapping[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    in_pooling: bool = True

    def for_input_type(self, input_type: str) -> str:
        """The prompt text of a role (``""``: none)."""
        names = _PROMPT_NAMES_OF.get(input_type)
        if names is None:
            allowed = ", ".join(INPUT_TYPES)
            raise InvalidInput(
                f"'input_type' must be one of {allowed}; got {input_type!r}.", param="input_type"
            )
        return next((self.prompts[name] for name in names if self.prompts.get(name)), "")

    def resolve(self, input_type: str | None = None, prompt_name: str | None = None) -> str:
        """The prompt of a request: ``prompt_name`` wins, then ``input_type``, then the
        model's default prompt. InvalidInput for a name the model does not have."""
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                known = ", ".join(sorted(self.prompts)) or "none"
                raise InvalidInput(
                    f"'prompt_name' {prompt_name!r} is not a prompt of this model "
                    f"(its prompts: {known}).",
                    param="prompt_name",
                )
            return self.prompts[prompt_name]
        if input_type is not None:
            return self.for_input_type(input_type)
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name, "")
        return ""


def merged_prompts(
    own: Mapping[str, str | None],
    own_default: str | None,
    overrides: Mapping[str, str],
    override_default: str | None,
    *,
    in_pooling: bool,
) -> ModelPrompts:
    """The model's own prompts with the operator's on top (``None`` values, sentence-
    transformers' placeholders, are no prompt)."""
    prompts = {name: text or "" for name, text in own.items()}
    prompts.update(overrides)
    default = override_default if override_default is not None else own_default
    if default is not None and default not in prompts:
        raise InvalidInput(f"default prompt name {default!r} is not one of {sorted(prompts)}")
    return ModelPrompts(prompts, default, in_pooling)
