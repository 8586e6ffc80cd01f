"""Cohere's error shape on Cohere-compatible routes: ``{"id", "message"}``.

Every error is produced once, in OpenAI's envelope (``api/errors.py``), by whichever layer
refuses the request: the key check, a rate limit, the body limit, validation or the route.
On the paths Cohere's clients call, this middleware rewrites that body into Cohere's shape and
keeps the status and headers (``Retry-After``, ``x-ratelimit-*``), so the Cohere SDK raises
its own typed error (``BadRequestError``, ``TooManyRequestsError``...) with a readable body.
Only error bodies are buffered: a success streams through untouched.
"""

from __future__ import annotations

from collections.abc import Collection

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The paths Cohere's SDK (and LangChain's and LlamaIndex's Cohere classes) call: embed v1/v2
# and rerank v1/v2. Jina's rerank clients call /v1/rerank too and read only the status.
COHERE_PATHS = ("/v2/embed", "/v1/embed", "/v1/rerank", "/v2/rerank")

# Bigger is not one of our envelopes: passed through as it is.
_MAX_ERROR_BODY = 64 * 1024


def cohere_error_body(request_id: str, message: str) -> bytes:
    return orjson.dumps({"id": request_id, "message": message})


def _rewritten(body: bytes, request_id: str) -> bytes | None:
    """Cohere's body for one of our OpenAI envelopes; None for anything else."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    return cohere_error_body(request_id, error["message"])


class CohereErrorMiddleware:
    """Rewrites error answers on ``paths`` into Cohere's shape (see the module docstring).
    Install it inside ``RequestIdMiddleware``: the body's ``id`` is the request's id."""

    def __init__(self, app: ASGIApp, paths: Collection[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        request_id = str(scope.get("state", {}).get("request_id", ""))
        start: Message | None = None
        chunks: list[bytes] = []
        size = 0

        async def send_cohere_shaped(message: Message) -> None:
            nonlocal start, size
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the whole body is known
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if more and size <= _MAX_ERROR_BODY:
                return
            body = b"".join(chunks)
            headers = list(start.get("headers", []))
            rewritten = None if more else _rewritten(body, request_id)
            if rewritten is not None:
                body = rewritten
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode("ascii")))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": more})
            start = None  # an oversized body: the rest streams through as it comes

        await self.app(scope, receive, send_cohere_shaped)
