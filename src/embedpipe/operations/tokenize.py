"""TEI's tokenize operation without HTTP: the tokens a model sees for each input.

The same rules as the embeddings: the prompt (``prompt_name`` or ``input_type``) is
prepended, a text past the window is cut on the side asked for (or refused with
``truncate: false``), and a long text is cut before it is tokenized whole. Only a model this
server runs itself has a tokenizer here; an upstream one is a 400.

Each token is ``{id, text, special, start, stop}`` as TEI answers it: a special token has its
own text and no offsets; any other token's ``start``/``stop`` are character offsets into the
prompt followed by the input, and ``text`` is that slice.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from embedpipe.embedders.prompts import InputType
from embedpipe.embedders.tokens import Truncation
from embedpipe.errors import InvalidInput
from embedpipe.inputs import check_sizes, check_text
from embedpipe.operations.model_inputs import refuse_over_window
from embedpipe.service import EmbeddingService
from embedpipe.settings import LimitsSettings

Token = dict[str, Any]


class TokenizeRequest(BaseModel):
    """TEI's tokenize request, plus ``model`` and the embeddings' truncation fields."""

    model_config = ConfigDict(extra="ignore")

    # Checked in tokenize(), for one clear error on "inputs" whatever was sent.
    inputs: Any = Field(
        description="A string or a list of strings.", examples=["what is an embedding?"]
    )
    model: str | None = Field(None, description="A served model; default: the default model.")
    add_special_tokens: bool = Field(True, strict=True)
    prompt_name: str | None = None
    input_type: InputType | None = None
    truncate: bool = Field(True, strict=True)
    truncation_direction: Truncation = "right"


def tokenize(
    service: EmbeddingService, limits: LimitsSettings, request: TokenizeRequest, default_model: str
) -> list[list[Token]]:
    """One list of tokens per input (InvalidInput or ModelNotFound otherwise). Synchronous:
    call it on a thread when the inputs are long."""
    model = service.resolve_model(request.model or default_model)
    served = service.models.get(model)
    tokenizer = served.tokenizer
    if tokenizer is None:
        raise InvalidInput(
            f"Model '{model}' is served by an upstream API: its tokenizer does not run here.",
            param="model",
        )
    prompt = served.prompts.resolve(request.input_type, request.prompt_name)
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise InvalidInput("'inputs' must be a string or a list of strings.", param="inputs")
    if not texts:
        raise InvalidInput("'inputs' must not be an empty list.", param="inputs")
    check_sizes(texts, limits, param="inputs")
    for index, text in enumerate(texts):
        check_text(text, index if len(texts) > 1 else None, limits, param="inputs")
    direction = request.truncation_direction
    full = [prompt + text for text in texts]
    clipped = served.clip(full, direction)
    if not request.truncate:
        refuse_over_window(tokenizer, full, clipped, "inputs")
    answers = []
    for text, cut in zip(full, clipped, strict=True):
        # A left clip keeps the end of the text: offsets count from where it starts.
        shift = len(text) - len(cut) if direction == "left" else 0
        encoding = tokenizer.encode(
            cut, add_special_tokens=request.add_special_tokens, truncation=direction
        )
        answers.append(_tokens(encoding, text, shift))
    return answers


def _tokens(encoding: Any, text: str, shift: int) -> list[Token]:
    tokens: list[Token] = []
    for token_id, token, (start, stop), special in zip(
        encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask, strict=True
    ):
        span = None if special else (start + shift, stop + shift)
        tokens.append(
            {
                "id": token_id,
                "text": token if span is None else text[span[0] : span[1]],
                "special": span is None,
                "start": None if span is None else span[0],
                "stop": None if span is None else span[1],
            }
        )
    return tokens
