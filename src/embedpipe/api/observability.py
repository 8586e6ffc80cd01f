"""HTTP observability: request metrics, the canonical access log line, recent traffic.

:class:`ObservabilityMiddleware` (pure ASGI: BaseHTTPMiddleware breaks streaming and
cancellation) wraps every request once. It counts it in ``embedpipe_http_requests_total`` and
``embedpipe_http_request_duration_seconds`` under its route *template* (``/v1/models/{model:path}``,
never the raw path; ``unmatched`` when no route matches the path, even a request refused before
routing such as a 401), writes one ``embedpipe.access`` log
line, and feeds a :class:`TrafficWindow`: the last minutes of this process's traffic in small
slots, which ``/stats`` and the ``/dashboard`` page read (where no Prometheus runs).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedpipe import __version__, metrics
from embedpipe.logs import request_fields
from embedpipe.runtime import Runtime

access_log = logging.getLogger("embedpipe.access")

UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Operations routes are counted and logged, but are not traffic on the dashboard.
_OPS_ROUTES = frozenset({"/health", "/ready", "/metrics", "/stats", "/dashboard"})
_MAX_LOGGED_PATH = 256

# Latency buckets of the traffic window: 0.5 ms to ~33 s, four per doubling (<= 19% error).
_LATENCY_BOUNDS = tuple(0.0005 * 2 ** (i / 4) for i in range(65))


def route_template(scope: Scope) -> str:
    """The template of the route that served this request (set on the scope by the router).
    A request refused before routing (a 401 from the key check, a 413) is matched here
    against the app's routes, as the router would have."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    router = getattr(scope.get("app"), "router", None)
    for route in getattr(router, "routes", ()):
        nested = getattr(route, "effective_route_contexts", None)  # an included router
        for candidate in nested() if callable(nested) else (route,):
            pattern = getattr(candidate, "path_regex", None)
            template = getattr(candidate, "path", None)
            if pattern is not None and pattern.match(scope["path"]) and isinstance(template, str):
                return template
    return UNMATCHED


@dataclass(slots=True)
class _Slot:
    number: int  # start time // slot length
    requests: int = 0
    errors: int = 0
    inputs: int = 0
    cache_hits: int = 0
    shared: int = 0  # joined a computation in flight: saved work, like a hit
    queue_depth: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(_LATENCY_BOUNDS) + 1))


def _quantile(counts: list[int], q: float) -> float | None:
    """Seconds at quantile q of a bucketed histogram, interpolated inside the bucket."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(_LATENCY_BOUNDS):
                return _LATENCY_BOUNDS[-1]
            low = _LATENCY_BOUNDS[index - 1] if index else 0.0
            return low + (_LATENCY_BOUNDS[index] - low) * (rank - seen) / count
        seen += count
    return _LATENCY_BOUNDS[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class TrafficWindow:
    """This process's requests over the last ``slots * slot_seconds`` seconds (ops excluded)."""

    def __init__(
        self,
        slot_seconds: float = 5.0,
        slots: int = 72,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.slot_seconds = slot_seconds
        self._slots: deque[_Slot] = deque(maxlen=slots)
        self._clock = clock
        self._queue_depth: Callable[[], int] = lambda: 0
        self.totals = {"requests": 0, "errors": 0, "inputs": 0, "cache_hits": 0, "shared": 0}

    def watch_queue(self, probe: Callable[[], int]) -> None:
        """Sample the batcher's queue depth with ``probe`` at each request and each snapshot."""
        self._queue_depth = probe

    def _current(self) -> _Slot:
        number = int(self._clock() // self.slot_seconds)
        if not self._slots or self._slots[-1].number != number:
            self._slots.append(_Slot(number))
        slot = self._slots[-1]
        slot.queue_depth = max(slot.queue_depth, self._queue_depth())
        return slot

    def record(
        self, seconds: float, status: int, inputs: int, cache_hits: int, shared: int = 0
    ) -> None:
        slot = self._current()
        error = int(status >= 500)
        slot.requests += 1
        slot.errors += error
        slot.inputs += inputs
        slot.cache_hits += cache_hits
        slot.shared += shared
        slot.latency[bisect.bisect_left(_LATENCY_BOUNDS, seconds)] += 1
        for key, value in (
            ("requests", 1),
            ("errors", error),
            ("inputs", inputs),
            ("cache_hits", cache_hits),
            ("shared", shared),
        ):
            self.totals[key] += value

    def snapshot(self, recent_seconds: float = 60.0) -> dict[str, Any]:
        """Totals, the last ``recent_seconds`` summed up, and one point per slot (gaps filled)."""
        now = self._current().number
        by_number = {slot.number: slot for slot in self._slots}
        first = now - (self._slots.maxlen or 1) + 1
        timeline = []
        for number in range(first, now + 1):
            slot = by_number.get(number) or _Slot(number)
            timeline.append(
                {
                    "t": number * self.slot_seconds,
                    "requests": slot.requests,
                    "errors": slot.errors,
                    "inputs": slot.inputs,
                    "cache_hits": slot.cache_hits,
                    "shared": slot.shared,
                    "queue_depth": slot.queue_depth,
                    "p50_ms": _ms(_quantile(slot.latency, 0.50)),
                    "p95_ms": _ms(_quantile(slot.latency, 0.95)),
                    "p99_ms": _ms(_quantile(slot.latency, 0.99)),
                }
            )
        recent_slots = [
            slot for slot in self._slots if slot.number > now - recent_seconds / self.slot_seconds
        ]
        merged = [sum(column) for column in zip(*(s.latency for s in recent_slots), strict=True)]
        requests = sum(slot.requests for slot in recent_slots)
        inputs = sum(slot.inputs for slot in recent_slots)
        hits = sum(slot.cache_hits for slot in recent_slots)
        shared = sum(slot.shared for slot in recent_slots)
        return {
            "now": round(self._clock(), 3),
            "slot_seconds": self.slot_seconds,
            "totals": dict(self.totals),
            "recent": {
                "seconds": recent_seconds,
                "requests": requests,
                "errors": sum(slot.errors for slot in recent_slots),
                "inputs": inputs,
                "cache_hits": hits,
                "shared": shared,
                # Work saved: cache hits and joins of a computation already in flight.
                "hit_ratio": round((hits + shared) / inputs, 4) if inputs else None,
                "p50_ms": _ms(_quantile(merged, 0.50)) if merged else None,
                "p95_ms": _ms(_quantile(merged, 0.95)) if merged else None,
                "p99_ms": _ms(_quantile(merged, 0.99)) if merged else None,
            },
            "timeline": timeline,
        }


class ObservabilityMiddleware:
    """Metrics, access log line and traffic window for every HTTP request.

    Sits inside RequestIdMiddleware (it logs the request id) and outside everything else, so
    that requests refused early (413, 401, 429) are counted too.
    """

    def __init__(self, app: ASGIApp, traffic: TrafficWindow) -> None:
        self.app = app
        self.traffic = traffic
        # The labelled children, looked up once per label set (``labels()`` takes a lock and
        # builds a key on every call). Bounded like the label sets themselves.
        self._counted: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._timed: dict[tuple[str, str], Callable[[float], None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # By path: the route template is only known once routing ran.
        is_work = scope["path"] not in _OPS_ROUTES
        if is_work:
            metrics.HTTP_IN_FLIGHT.inc()
        with request_fields() as fields:
            try:
                await self.app(scope, receive, send_and_note)
            finally:
                if is_work:
                    metrics.HTTP_IN_FLIGHT.dec()
                self._finish(scope, status, time.perf_counter() - started, fields)

    def _finish(self, scope: Scope, status: int, seconds: float, fields: dict[str, Any]) -> None:
        route = route_template(scope)
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        count = self._counted.get((route, method, status))
        if count is None:
            count = metrics.HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc
            self._counted[route, method, status] = count
        count()
        observe = self._timed.get((route, method))
        if observe is None:
            observe = metrics.HTTP_DURATION.labels(route=route, method=method).observe
            self._timed[route, method] = observe
        observe(seconds)
        inputs = int(fields.get("inputs", 0))
        cache_hits = int(fields.get("cache_hits", 0))
        shared = int(fields.get("shared", 0))
        if route not in _OPS_ROUTES:
            self.traffic.record(seconds, status, inputs, cache_hits, shared)
        line = {
            "request_id": scope.get("state", {}).get("request_id"),
            "method": method,
            "route": route,
            "path": scope["path"][:_MAX_LOGGED_PATH],
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            **fields,
            "inputs": inputs,
            "cache_hits": cache_hits,
        }
        access_log.info("request", extra={"fields": line})


def on_startup(runtime: Runtime, traffic: TrafficWindow) -> None:
    """Info gauges, queue capacity and the queue probe of a process whose runtime is open."""
    models = [embedder.info for embedder in runtime.service.models]
    metrics.describe_process(
        __version__,
        [(m.name, m.backend, m.dimensions, m.max_tokens, m.weights_sha256 or "") for m in models],
    )
    for info in models:
        queue = runtime.settings.upstream if info.upstream else runtime.settings.batching
        metrics.QUEUE_CAPACITY.labels(model=info.name).set(queue.max_queue_texts)
    metrics.start_at_zero(jobs=True)  # the Batch API is served by every API process
    traffic.watch_queue(lambda: sum(runtime.service.queue_depth().values()))


def on_shutdown() -> None:
    metrics.process_exiting()
