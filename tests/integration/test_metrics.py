"""/metrics against real server processes: the counters match the traffic sent exactly, with
one process and with two worker processes (prometheus_client multiprocess mode, its folder
emptied at start); every request leaves one JSON access line and no input text."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

SECRET = "a sentence that is embedded but must never be logged"
QUEUE = 8192  # EMBEDPIPE_BATCHING__MAX_QUEUE_TEXTS default, per worker


def _samples(server: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _embedded(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
    return sum(
        value for (name, _), value in samples.items() if name == "embedpipe_embeddings_total"
    )


async def _send_traffic(url: str, tag: str) -> None:
    """30 /embed (10 texts), 10 /v1/embeddings of 2 texts, 4 bad /embed, 5 unknown routes.

    No keep-alive: every request is a new connection, so the workers share the load."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        gate = asyncio.Semaphore(6)

        async def one(method: str, path: str, body: object | None, want: int) -> None:
            async with gate:
                reply = await http.request(method, path, json=body)
            assert reply.status_code == want, reply.text

        await asyncio.gather(
            *(one("POST", "/embed", {"text": f"{tag} {i % 10}"}, 200) for i in range(30)),
            *(
                one(
                    "POST", "/v1/embeddings", {"model": MODEL, "input": [f"{tag} {i}", SECRET]}, 200
                )
                for i in range(10)
            ),
            *(one("POST", "/embed", {"txt": "no text field"}, 400) for _ in range(4)),
            *(one("GET", f"/no/such/route/{i}", None, 404) for i in range(5)),
        )


def _assert_counts_grew_by_the_traffic(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> None:
    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    requests = "embedpipe_http_requests_total"
    assert grew(requests, route="/embed", method="POST", status="200") == 30
    assert grew(requests, route="/v1/embeddings", method="POST", status="200") == 10
    assert grew(requests, route="/embed", method="POST", status="400") == 4
    assert grew(requests, route="unmatched", method="GET", status="404") == 5
    duration = "embedpipe_http_request_duration_seconds_count"
    assert grew(duration, route="/embed", method="POST") == 34
    assert grew(duration, route="/v1/embeddings", method="POST") == 10
    assert _embedded(after) - _embedded(before) == 30 + 20


def test_counters_match_the_traffic_exactly(embedded_server: ServerProcess) -> None:
    before = _samples(embedded_server)
    asyncio.run(_send_traffic(embedded_server.url, "single"))
    after = _samples(embedded_server)
    _assert_counts_grew_by_the_traffic(before, after)
    assert _value(after, "embedpipe_queue_capacity", model=MODEL) == QUEUE
    assert (
        _value(after, "embedpipe_build_info", version="0.1.0", python=sys.version.split()[0]) == 1
    )


def test_every_request_has_one_json_access_line_without_its_text(
    embedded_server: ServerProcess,
) -> None:
    request_id = f"log-test-{time.monotonic_ns()}"
    reply = httpx.post(
        f"{embedded_server.url}/v1/embeddings",
        json={"model": MODEL, "input": [SECRET, SECRET, "another text"]},
        headers={"x-request-id": request_id},
        timeout=30,
    )
    assert reply.status_code == 200 and reply.headers["x-request-id"] == request_id
    deadline = time.monotonic() + 5
    while request_id not in (text := embedded_server.log_path.read_text()):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.05)
    lines = [orjson.loads(line) for line in text.splitlines() if request_id in line]
    assert len(lines) == 1
    line = lines[0]
    assert line["logger"] == "embedpipe.access" and line["level"] == "info"
    assert (line["method"], line["route"], line["status"]) == ("POST", "/v1/embeddings", 200)
    assert line["inputs"] == 3 and line["model"] == MODEL
    assert line["cache_hits"] >= 1  # the repeated text at least
    assert line["duration_ms"] > 0 and line["tokens"] > 0
    assert SECRET not in text
    # No other access log: uvicorn's is off.
    assert not any('"logger":"uvicorn.access"' in row for row in text.splitlines())


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("two-workers")
    metrics_dir = root / "prometheus-multiproc"
    metrics_dir.mkdir()
    # A previous run's samples, as a crashed server would leave them: must not be counted.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from embedpipe import metrics\n"
            "metrics.HTTP_REQUESTS.labels('/embed', 'POST', '200').inc(1000)\n"
            "metrics.EMBEDDINGS.labels('m', 'l1').inc(1000)",
        ],
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PATH": ""},
        check=True,
    )
    assert list(metrics_dir.glob("counter_*.db"))
    server = ServerProcess(
        {
            "EMBEDPIPE_WORKERS": "2",
            "EMBEDPIPE_DATA_DIR": str(root / "data"),
            "EMBEDPIPE_REDIS_URL": "",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
        root / "server.log",
    )
    server.start()
    try:
        # /ready answers once one worker is up; wait for the second one too.
        deadline = time.monotonic() + 180
        while server.metric("embedpipe_queue_capacity", model=MODEL) < 2 * QUEUE:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.5)
        yield server
    finally:
        server.stop()


def test_two_workers_count_exactly_once_each(two_workers: ServerProcess) -> None:
    before = _samples(two_workers)
    assert (
        _value(before, "embedpipe_http_requests_total", route="/embed", method="POST", status="200")
        == 0
    )
    assert _embedded(before) == 0  # the stale samples were cleaned away
    asyncio.run(_send_traffic(two_workers.url, "workers"))
    after = _samples(two_workers)
    _assert_counts_grew_by_the_traffic(before, after)
    # Gauges merge as declared: capacity adds up over live workers, info is one series.
    assert _value(after, "embedpipe_queue_capacity", model=MODEL) == 2 * QUEUE
    assert _value(after, "embedpipe_queue_depth", model=MODEL) == 0
    assert sum(1 for name, _ in after if name == "embedpipe_model_info") == 1
    # Both workers served (the merged numbers are not one worker's).
    pids = {
        orjson.loads(line)["pid"]
        for line in Path(two_workers.log_path).read_text().splitlines()
        if '"logger":"embedpipe.access"' in line and '"route":"/embed"' in line
    }
    assert len(pids) == 2, pids
