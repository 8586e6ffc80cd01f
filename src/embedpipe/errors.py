"""Domain errors. They know nothing about HTTP; ``error_status.py`` maps each to a status.

EmbedpipeError
├── InvalidInput          the request is malformed (bad types, empty text, bad dimensions)
│   └── TooLarge          what it sends (an uploaded file) is over its size limit
├── ModelNotFound         no served model has that name
├── NotFound              no such file or batch (or not this API key's)
├── Overloaded            the queue is full; retry after ``retry_after`` seconds
├── NotReady              models are loading or the process is draining
├── ModelFailed           the model raised while computing a batch (details only in logs)
├── ModelLoadError        at start-up: the weights are missing, unreadable or not the expected
├── DatasetError          ``embedpipe embed``: the input or output file cannot be used
└── UpstreamError         an upstream embedding API (``openai`` backend) could not answer
    ├── UpstreamRateLimited   it kept answering 429; retry after ``retry_after`` seconds
    ├── UpstreamUnavailable   its circuit breaker is open: no call is tried for now
    └── UpstreamFailed        5xx, timeouts, refused connections, rejected credentials
"""

from __future__ import annotations


class EmbedpipeError(Exception):
    """Base of every error embedpipe raises on purpose."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidInput(EmbedpipeError):
    pass


class TooLarge(InvalidInput):
    pass


class ModelNotFound(EmbedpipeError):
    pass


class NotFound(EmbedpipeError):
    pass


class Overloaded(EmbedpipeError):
    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message, code="overloaded")
        self.retry_after = retry_after


class NotReady(EmbedpipeError):
    pass


class ModelFailed(EmbedpipeError):
    pass


class ModelLoadError(EmbedpipeError):
    """The weights are missing, unreadable or not the ones expected."""


class DatasetError(EmbedpipeError):
    """The input or output file cannot be used as a whole (unknown format, missing column,
    not UTF-8, a fatal bad row)."""


class UpstreamError(EmbedpipeError):
    """The upstream API failed; messages never carry its credentials or raw answers."""


class UpstreamRateLimited(UpstreamError):
    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message, code="upstream_rate_limited")
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message, code="upstream_unavailable")
        self.retry_after = retry_after


class UpstreamFailed(UpstreamError):
    pass
