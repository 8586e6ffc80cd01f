"""JSON log lines, the canonical request fields and the logging configuration."""

from __future__ import annotations

import asyncio
import io
import logging
import logging.config
from pathlib import Path

import httpx
import orjson

from embedpipe import logs
from embedpipe.settings import Settings


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


def test_text_lines_cannot_be_forged() -> None:
    forged = "/v1/x\n2026-01-01T00:00:00.000Z INFO embedpipe.access: admin logged in"
    text = logs.TextFormatter().format(
        _record(fields={"path": forged, "agent": "a\r\x1b[31mred\u2028"}, other="b\x00c")
    )
    assert len(text.splitlines()) == 1
    assert "\\n2026-01-01" in text and "\\r\\x1b[31mred\\u2028" in text and "b\\x00c" in text
    # Only control characters are escaped: the rest of the text reads as it was.
    plain = logs.TextFormatter().format(_record(fields={"path": "/café/naïve 東京"}))
    assert plain.endswith("path=/café/naïve 東京")


async def test_a_request_path_cannot_forge_a_text_line(tmp_path: Path) -> None:
    from tests.fakes import fake_app

    app, runtime = fake_app(Settings(data_dir=tmp_path / "data"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    access = logging.getLogger("embedpipe.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            await client.get("/nothing%0a2026-01-01T00:00:00.000Z%20INFO%20forged:%20line")
    finally:
        access.setLevel(level)
        access.removeHandler(handler)
        await runtime.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "forged" in lines[0] and "\\n" in lines[0], lines
