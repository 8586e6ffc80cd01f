"""Domain errors. They know nothing about HTTP; ``api/errors.py`` maps each to a status.

EmbedpipeError
├── InvalidInput          the request is malformed (bad types, empty text, bad dimensions)
├── ModelNotFound         no served model has that name
├── Overloaded            the queue is full; retry after ``retry_after`` seconds
├── NotReady              models are loading or the process is draining
└── ModelFailed           the model raised while computing a batch (details only in logs)
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
