"""Errors as HTTP answers: OpenAI's envelope everywhere (Cohere's routes rewrite it into their
shape in ``api/cohere_errors.py``), never a stack trace. The status of
a domain error comes from ``embedpipe.error_status`` (shared with batch output lines).

``{"error": {"message", "type", "param", "code"}}``
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from embedpipe.error_status import status_for
from embedpipe.errors import (
    EmbedpipeError,
    NotReady,
    Overloaded,
    UpstreamRateLimited,
    UpstreamUnavailable,
)

log = logging.getLogger("embedpipe.api")

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(
    status: int,
    message: str,
    *,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def _domain_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, EmbedpipeError)
    status, type_ = status_for(exc)
    headers = None
    if isinstance(exc, Overloaded | NotReady | UpstreamRateLimited | UpstreamUnavailable):
        retry_after = 1.0 if isinstance(exc, NotReady) else exc.retry_after
        # Both forms, as OpenAI sends them: whole seconds (HTTP) and milliseconds.
        headers = {
            "Retry-After": str(max(1, math.ceil(retry_after))),
            "retry-after-ms": str(max(1, math.ceil(retry_after * 1000))),
        }
    return error_response(
        status, exc.message, type_=type_, param=exc.param, code=exc.code, headers=headers
    )


def _location(loc: tuple[Any, ...]) -> str | None:
    # Only the leading part says where the field was (a body field may be named "query").
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    return ".".join(str(part) for part in loc) or None


def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    param = _location(loc)
    kind = first.get("type", "")
    if kind in ("json_invalid", "value_error.jsondecode"):
        message = "The request body is not valid JSON."
        param = None
    elif kind == "missing" and loc == ("body",):
        message = "The request body is missing; send a JSON object."
    else:
        reason = first.get("msg", "is invalid")
        message = f"'{param}': {reason}." if param else f"Invalid request: {reason}."
    return error_response(400, message, type_="invalid_request_error", param=param)


def _allowed_methods(request: Request) -> str:
    """Every method the path serves. Starlette's 405 names only those of the first route that
    matched the path, and one path's GET and POST are often two routes."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in request.app.routes:
        nested = getattr(route, "effective_route_contexts", None)  # an included router
        for candidate in nested() if callable(nested) else (route,):
            pattern = getattr(candidate, "path_regex", None)
            if pattern is not None and pattern.match(path):
                methods.update(getattr(candidate, "methods", None) or ())
    return ", ".join(sorted(methods))


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else "Request failed."
    if status == 404 and detail == "Not Found":
        detail = "Unknown route."
    headers = dict(exc.headers or {})
    if status == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    type_ = _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return error_response(status, detail, type_=type_, headers=headers or None)


def _store_unreachable(request: Request, exc: Exception) -> Response:
    # A Redis the route needs (the broker: files and batches) is down or restarting: the
    # client may retry, as with any 503; nothing about the request was wrong.
    log.warning("a Redis did not answer on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "A store the service depends on did not answer; retry shortly.",
        type_="server_error",
        code="service_unavailable",
        headers={"Retry-After": "1"},
    )


def _unexpected_error(request: Request, exc: Exception) -> Response:
    # The details stay in the log; the client gets a generic message.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        500, "The server had an error processing your request.", type_="server_error"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EmbedpipeError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisConnectionError, _store_unreachable)
    app.add_exception_handler(RedisTimeoutError, _store_unreachable)
    app.add_exception_handler(Exception, _unexpected_error)
