"""JSON log lines, the canonical request fields and the logging configuration."""

from __future__ import annotations

import asyncio
import io
import logging
import logging.config

import orjson

from embedpipe import logs


def _record(**extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "embedpipe.test", "levelno": 20, "levelname": "INFO"})
    record.msg = "hello %s"
    record.args = ("world",)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_fields_flat() -> None:
    line = orjson.loads(logs.JsonFormatter().format(_record(fields={"status": 200}, other=1)))
    assert line["msg"] == "hello world"
    assert line["level"] == "info" and line["logger"] == "embedpipe.test"
    assert line["status"] == 200 and line["other"] == 1
    assert line["ts"].endswith("Z") and isinstance(line["pid"], int)


def test_exceptions_are_one_json_line() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = _record(exc_info=sys.exc_info())
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    assert "ValueError: bad" in orjson.loads(text)["exc"]


def test_text_format_for_humans() -> None:
    text = logs.TextFormatter().format(_record(fields={"status": 200}))
    assert text.endswith("INFO embedpipe.test: hello world status=200")


async def test_annotate_reaches_the_request_fields_from_tasks_it_starts() -> None:
    logs.annotate(ignored=True)  # outside a request: nothing to add to, no error
    with logs.request_fields() as fields:

        async def service() -> None:
            logs.annotate(inputs=3, cache_hits=2)

        await asyncio.ensure_future(service())  # as unless_disconnected runs the service
    assert fields == {"inputs": 3, "cache_hits": 2}


def test_the_config_sends_json_to_stdout_and_silences_uvicorn_access() -> None:
    config = logs.logging_config("info", "json")
    stream = io.StringIO()
    config["handlers"]["stdout"]["stream"] = stream
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logging.config.dictConfig(config)
        logging.getLogger("uvicorn.access").info("GET / 200")
        logging.getLogger("uvicorn.error").info("Started server process")
        logging.getLogger("embedpipe.access").info("request", extra={"fields": {"status": 200}})
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["logger"] for line in lines] == ["uvicorn.error", "embedpipe.access"]
    assert lines[1]["status"] == 200
