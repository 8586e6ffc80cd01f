"""What a client is told about a domain error: the HTTP status and OpenAI's error ``type``.

The one table, used by the routes (``api/errors.py``) and by batch output lines alike, so a
batch line fails exactly as the same request would online. The lookup walks the error's class
hierarchy, most specific class first: no dict order decides a status, and a test checks that
every ``EmbedpipeError`` subclass is listed here explicitly. The ``code`` and the message
travel on the error itself.
"""

from __future__ import annotations

from typing import NamedTuple

from embedpipe.errors import (
    DatasetError,
    EmbedpipeError,
    InvalidInput,
    ModelFailed,
    ModelLoadError,
    ModelNotFound,
    NotFound,
    NotReady,
    Overloaded,
    TooLarge,
    UpstreamError,
    UpstreamFailed,
    UpstreamRateLimited,
    UpstreamUnavailable,
)


class ErrorStatus(NamedTuple):
    status: int
    type: str


SERVER_ERROR = ErrorStatus(500, "server_error")

ERROR_STATUS: dict[type[EmbedpipeError], ErrorStatus] = {
    EmbedpipeError: SERVER_ERROR,
    InvalidInput: ErrorStatus(400, "invalid_request_error"),
    TooLarge: ErrorStatus(413, "invalid_request_error"),
    ModelNotFound: ErrorStatus(404, "invalid_request_error"),
    NotFound: ErrorStatus(404, "invalid_request_error"),
    Overloaded: ErrorStatus(503, "server_overloaded"),
    NotReady: ErrorStatus(503, "service_unavailable"),
    ModelFailed: SERVER_ERROR,
    ModelLoadError: SERVER_ERROR,  # at start-up, never a request's answer
    DatasetError: ErrorStatus(400, "invalid_request_error"),
    # The upstream API (``openai`` backend): its 429 stays a 429; its failures are a bad
    # gateway (502), or 503 while its circuit breaker is open.
    UpstreamError: ErrorStatus(502, "upstream_error"),
    UpstreamFailed: ErrorStatus(502, "upstream_error"),
    UpstreamRateLimited: ErrorStatus(429, "rate_limit_error"),
    UpstreamUnavailable: ErrorStatus(503, "service_unavailable"),
}


def status_for(error: EmbedpipeError) -> ErrorStatus:
    """The status and error type of ``error``: its own class's entry, else its nearest
    listed ancestor's."""
    for cls in type(error).__mro__:
        mapped = ERROR_STATUS.get(cls)
        if mapped is not None:
            return mapped
    return SERVER_ERROR
