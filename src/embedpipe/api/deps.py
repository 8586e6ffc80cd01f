"""Request-scoped helpers shared by the routers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
import orjson
from fastapi import Request
from starlette.responses import Response

from embedpipe.runtime import Runtime

T = TypeVar("T")


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


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
