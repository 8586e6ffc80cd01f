"""Models served by an OpenAI-compatible upstream API: the ``openai`` backend.

embedpipe in front of a paid API: its cache makes repeated text free, its batcher packs the
texts of concurrent requests into calls within the provider's limits, and its client survives
the provider's rate limits and outages. Built in the composition root::

    model, batcher = open_upstream(spec, settings)   # no network: start-up never waits on it
    registry.add(spec, model)                        # the service sees a ServedModel
    batcher.start()                                  # ... and a Batcher; await batcher.stop()
"""

from __future__ import annotations

from embedpipe.embedders.prompts import ModelPrompts, merged_prompts
from embedpipe.embedders.registry import ModelSpec
from embedpipe.errors import InvalidInput
from embedpipe.settings import ModelOptions, Settings
from embedpipe.upstream.batcher import UpstreamBatcher
from embedpipe.upstream.client import UpstreamAnswer, UpstreamClient
from embedpipe.upstream.model import KNOWN_DIMENSIONS, UpstreamModel, public_url

__all__ = [
    "KNOWN_DIMENSIONS",
    "UpstreamAnswer",
    "UpstreamBatcher",
    "UpstreamClient",
    "UpstreamModel",
    "describe_upstream",
    "open_upstream",
]

_OPENAI_HOST = "api.openai.com"


def describe_upstream(spec: ModelSpec, settings: Settings) -> UpstreamModel:
    """The model alone (``embedpipe models``): name, size, token counts; no client."""
    return UpstreamModel(
        spec.name,
        spec.source,
        settings.openai_base_url,
        dimensions=settings.openai_dimensions,
        max_input_tokens=settings.upstream.max_input_tokens,
        price_per_million_tokens=settings.openai_price_per_million_tokens,
        prompts=_prompts(settings.model_options.get(spec.name)),
    )


def _prompts(options: ModelOptions | None) -> ModelPrompts:
    """Prompts the operator gave an upstream model: prepended to its texts, as any prompt a
    model pools over."""
    if options is None:
        return ModelPrompts()
    return merged_prompts({}, None, options.prompts, options.default_prompt_name, in_pooling=True)


def open_upstream(spec: ModelSpec, settings: Settings) -> tuple[UpstreamModel, UpstreamBatcher]:
    """The model and its batcher (not started). Makes no call: an upstream that is down
    must not keep this process from serving its cache and its other models."""
    api_key = settings.openai_api_key.get_secret_value()
    if not api_key and _OPENAI_HOST in public_url(settings.openai_base_url):
        raise InvalidInput(
            f"model '{spec.name}' is served by OpenAI's API, which needs a key: set "
            "EMBEDPIPE_OPENAI_API_KEY"
        )
    model = describe_upstream(spec, settings)
    client = UpstreamClient.open(
        spec.name,
        spec.source,
        base_url=settings.openai_base_url,
        api_key=api_key,
        settings=settings.upstream,
    )
    return model, UpstreamBatcher(model, client, settings.upstream)
