"""Request-scoped helpers shared by the routers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from embedpipe.errors import InvalidInput
from embedpipe.runtime import Runtime

T = TypeVar("T")
Body = TypeVar("Body", bound=BaseModel)

# A body larger than this is parsed, and its inputs checked and decoded, on a thread: 14 MB of
# token ids took the event loop (and every other request, /health included) for 4 s.
INLINE_BODY_BYTES = 64 * 1024


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    # hop per request (a tenth of a cache hit's time, measured) for one attribute read.
    runtime: Runtime = request.app.state.runtime
    return runtime


async def json_body(
    request: Request, model: type[Body], *, max_values: int | None = None, param: str = "input"
) -> Body:
    """The request's JSON body as ``model``, parsed and validated in one pass by pydantic-core.

    The embedding routes read their bodies with this rather than a FastAPI body parameter,
    which parses with the stdlib ``json``, inspects the content type with ``email.message`` and
    validates in a second pass: about 6% of a cache hit's time, measured. Errors are
    FastAPI's own (a 400 in OpenAI's envelope); document the body with :func:`body_schema`.
    """
    raw = await request.body()
    # Parsing holds the GIL, on a thread too (0.3 s for 2M numbers here): a body with more
    # values than could be valid is refused first, by its commas (one per value but the
    # first, in strings too: a bound, counted in milliseconds).
    if max_values is not None and raw.count(b",") > max_values:
        raise InvalidInput(
            f"The body holds more than {max_values} values: more inputs, characters or "
            "token ids than one request may hold.",
            param=param,
        )
    if len(raw) <= INLINE_BODY_BYTES:
        return _parsed(raw, model)
    return await asyncio.to_thread(_parsed, raw, model)


def _parsed(raw: bytes, model: type[Body]) -> Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None


async def off_loop_if_big(request: Request, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, on a thread when the request's body (already read) is big."""
    if len(await request.body()) <= INLINE_BODY_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` that documents a route's JSON body read with :func:`json_body`."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away, so no one computes for nobody.

    Once the body is read, ``receive()`` only returns when the connection closes.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(request.receive())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        message = watcher.result()
        if message.get("type") != "http.disconnect":
            return await task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def _array_as_list(value: object) -> object:
    # orjson serialises only C-contiguous arrays natively; anything else goes the slow way.
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_response(
    content: object, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """orjson with numpy support: float32 vectors serialise without a Python float list."""
    body = orjson.dumps(content, default=_array_as_list, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)
