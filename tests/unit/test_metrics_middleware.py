"""The observability middleware on a small in-process app: route templates as labels, exact
counts, the access log line, and the traffic window behind /stats and /dashboard."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY

from embedpipe import logs
from embedpipe.api.middleware import RequestIdMiddleware
from embedpipe.api.observability import ObservabilityMiddleware, TrafficWindow
from embedpipe.api.security import AuthMiddleware
from embedpipe.auth import KeyStore

SECRET_TEXT = "the input text must never reach a log line"


def _app(traffic: TrafficWindow, keys: KeyStore | None = None) -> FastAPI:
    router = APIRouter(prefix="/unit")

    @router.post("/things")
    async def things(body: dict[str, list[str]]) -> dict[str, int]:
        logs.annotate(inputs=len(body["texts"]), cache_hits=1)
        return {"count": len(body["texts"])}

    @router.get("/items/{item:path}")
    async def item(item: str) -> dict[str, str]:
        return {"item": item}

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    app = FastAPI()
    app.include_router(router)
    if keys is not None:  # as create_app orders them: the key check runs before routing
        app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(ObservabilityMiddleware, traffic=traffic)
    app.add_middleware(RequestIdMiddleware)
    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app(TrafficWindow()), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        yield http


def _count(route: str, method: str, status: str) -> float:
    labels = {"route": route, "method": method, "status": status}
    return REGISTRY.get_sample_value("embedpipe_http_requests_total", labels) or 0.0


def _observed(route: str, method: str) -> float:
    labels = {"route": route, "method": method}
    return REGISTRY.get_sample_value("embedpipe_http_request_duration_seconds_count", labels) or 0.0


async def test_routes_are_counted_by_template_never_by_raw_path(
    client: httpx.AsyncClient,
) -> None:
    before = _count("/unit/items/{item:path}", "GET", "200")
    for path in ("a", "b/c", "d%20e"):
        assert (await client.get(f"/unit/items/{path}")).status_code == 200
    assert _count("/unit/items/{item:path}", "GET", "200") == before + 3
    assert _observed("/unit/items/{item:path}", "GET") >= 3
    text = REGISTRY.get_sample_value  # no series may carry a raw path
    assert text("embedpipe_http_requests_total", {"route": "/unit/items/a"}) is None


async def test_unknown_routes_share_one_label_and_methods_are_bounded(
    client: httpx.AsyncClient,
) -> None:
    before = _count("unmatched", "GET", "404")
    for path in ("/nope", "/also/nope", "/unit/itemz"):
        assert (await client.get(path)).status_code == 404
    assert _count("unmatched", "GET", "404") == before + 3
    other = _count("/unit/things", "OTHER", "405")
    assert (await client.request("BREW", "/unit/things")).status_code == 405
    assert _count("/unit/things", "OTHER", "405") == other + 1


async def test_a_401_before_routing_still_counts_under_its_route() -> None:
    app = _app(TrafficWindow(), keys=KeyStore.load("unit-test-key", None))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    before = _count("/unit/items/{item:path}", "GET", "401")
    unknown = _count("unmatched", "GET", "401")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/unit/items/a")).status_code == 401
        assert (await http.get("/unit/nothing-here")).status_code == 401
        authorised = {"Authorization": "Bearer unit-test-key"}
        assert (await http.get("/unit/items/a", headers=authorised)).status_code == 200
    assert _count("/unit/items/{item:path}", "GET", "401") == before + 1
    assert _count("unmatched", "GET", "401") == unknown + 1


async def test_an_unhandled_error_counts_as_500(client: httpx.AsyncClient) -> None:
    before = _count("/unit/boom", "GET", "500")
    assert (await client.get("/unit/boom")).status_code == 500
    assert _count("/unit/boom", "GET", "500") == before + 1


async def test_one_access_line_per_request_with_counts_and_no_text(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="embedpipe.access"):
        reply = await client.post(
            "/unit/things",
            json={"texts": [SECRET_TEXT, "two"]},
            headers={"x-request-id": "req-42"},
        )
    assert reply.headers["x-request-id"] == "req-42"
    lines = [record for record in caplog.records if record.name == "embedpipe.access"]
    assert len(lines) == 1
    fields = lines[0].__dict__["fields"]
    assert fields["request_id"] == "req-42"
    assert (fields["method"], fields["route"], fields["status"]) == ("POST", "/unit/things", 200)
    assert (fields["inputs"], fields["cache_hits"]) == (2, 1)
    assert fields["duration_ms"] > 0
    assert SECRET_TEXT not in logs.JsonFormatter().format(lines[0])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_traffic_window_quantiles_hit_ratio_and_timeline() -> None:
    clock = FakeClock()
    window = TrafficWindow(slot_seconds=5, slots=12, clock=clock)
    depth = iter(range(1000))
    window.watch_queue(lambda: next(depth))
    for i in range(100):  # 1 ms .. 100 ms
        window.record((i + 1) / 1000, 200, inputs=2, cache_hits=1)
    window.record(0.5, 503, inputs=1, cache_hits=0)
    window.record(0.002, 200, inputs=4, cache_hits=0, shared=3)  # joined work in flight
    clock.now += 20
    snapshot = window.snapshot()
    recent = snapshot["recent"]
    assert recent["requests"] == 102 and recent["errors"] == 1
    # Saved work: cache hits and shared computations alike.
    assert recent["hit_ratio"] == round((100 + 3) / 205, 4)
    assert (recent["cache_hits"], recent["shared"]) == (100, 3)
    # Bucketed quantiles are within one bucket (19%) of the exact ones.
    assert 50 / 1.19 <= recent["p50_ms"] <= 51 * 1.19
    assert 95 / 1.19 <= recent["p95_ms"] <= 96 * 1.19
    assert 99 / 1.19 <= recent["p99_ms"] <= 500
    timeline = snapshot["timeline"]
    assert len(timeline) == 12  # gaps are filled with empty slots
    assert [point["requests"] for point in timeline[-5:]] == [102, 0, 0, 0, 0]
    assert timeline[-5]["queue_depth"] == 101  # the max sampled in that slot (0..101)
    assert timeline[-5]["shared"] == 3
    assert timeline[-1]["p95_ms"] is None
    assert snapshot["totals"] == {
        "requests": 102,
        "errors": 1,
        "inputs": 205,
        "cache_hits": 100,
        "shared": 3,
    }
    clock.now += 120  # older than "recent"
    assert window.snapshot()["recent"]["requests"] == 0
