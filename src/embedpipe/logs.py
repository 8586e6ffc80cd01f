"""Logging: JSON lines on stdout (or readable text), and the canonical line of a request.

``logging_config(level, fmt)`` is a ``logging.config.dictConfig`` dict; the CLI hands it to
uvicorn, which applies it in every worker process. uvicorn's own access log is off: the
access line is ours (``embedpipe.access``), one per request, with the fields that code
further down added through :func:`annotate` (input count, cache hits, tokens). Input text is
never a field.

Usage::

    with request_fields() as fields:   # the HTTP middleware, around one request
        ...                            # the service calls annotate(inputs=3, cache_hits=2)
    log.info("request", extra={"fields": fields})
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import orjson

LogFormat = Literal["json", "text"]

_REQUEST_FIELDS: ContextVar[dict[str, Any] | None] = ContextVar("embedpipe_request", default=None)

# Attributes every LogRecord has; anything else was passed through `extra`. uvicorn adds
# `color_message` (its message with ANSI colours) to some records.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


@contextmanager
def request_fields() -> Iterator[dict[str, Any]]:
    """Collect the fields of one request's canonical log line (tasks it starts share them)."""
    fields: dict[str, Any] = {}
    token = _REQUEST_FIELDS.set(fields)
    try:
        yield fields
    finally:
        _REQUEST_FIELDS.reset(token)


def annotate(**fields: Any) -> None:
    """Add fields to the current request's log line; outside a request, do nothing."""
    current = _REQUEST_FIELDS.get()
    if current is not None:
        current.update(fields)


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    extra = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}
    nested = extra.pop("fields", None)
    if isinstance(nested, dict):
        extra.update(nested)
    return extra


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, pid, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        line.update(_fields_of(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(line, default=str).decode()
        except orjson.JSONEncodeError:  # text orjson refuses (an unpaired surrogate): escaped
            return json.dumps(line, default=str, separators=(",", ":"))


# Line breaks, other control characters and Unicode's line separators: in a text log they
# would let a client's path or header forge a line of its own.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(text: str) -> str:
    """``text`` with every control character as a visible escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class TextFormatter(logging.Formatter):
    """``ts level logger: msg key=value ...`` for a human at a terminal; one record is always
    one line (a traceback aside), whatever the request carried."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(_escaped(f"{key}={value}") for key, value in _fields_of(record).items())
        message = _escaped(record.getMessage())
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        text = f"{text} {pairs}" if pairs else text
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


def logging_config(level: str, fmt: LogFormat = "json") -> dict[str, Any]:
    """A dictConfig: everything to stdout in one format; uvicorn's access log silenced."""
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True, "level": level.upper()},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
            # The openai SDK's HTTP client logs every upstream call at INFO; ours count them.
            "httpx2": {"handlers": [], "propagate": True, "level": "WARNING"},
        },
    }
