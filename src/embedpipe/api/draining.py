"""Graceful shutdown: /ready turns 503 the moment SIGTERM arrives, new work is refused, and
uvicorn's own shutdown (which waits for the requests in flight) starts after a drain delay.

The delay lets load balancers see /ready fail and stop routing here before the listener
closes; during it the process still answers /health, /ready and /metrics, and refuses new
work with 503 + Retry-After so clients retry on another replica. SIGINT (Ctrl-C at a
terminal) and a second signal skip the delay.

uvicorn installs its own handlers before the lifespan starts; we chain in front of them
rather than replace them, and restore them when the lifespan ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from embedpipe.api.errors import error_response

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Routes that keep answering while the process drains: probes and scrapes, not work.
_STILL_SERVED = frozenset({"/health", "/ready", "/metrics", "/stats"})


@contextmanager
def on_shutdown_signal(
    mark_draining: Callable[[], None], drain_delay_seconds: float = 0.0
) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled on the main thread (e.g. an in-process test)
        return
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    pending: list[threading.Timer] = []

    def shut_down(sig: int, frame: FrameType | None) -> None:
        chained = previous[signal.Signals(sig)]
        if callable(chained):
            chained(sig, frame)
        elif chained == signal.SIG_DFL:
            signal.default_int_handler(sig, frame)

    def handler(sig: int, frame: FrameType | None) -> None:
        mark_draining()
        delayed = sig == signal.SIGTERM and drain_delay_seconds > 0 and not pending
        if not delayed:
            for timer in pending:
                timer.cancel()
            shut_down(sig, frame)
            return
        # uvicorn's handler only sets flags, so calling it from a timer thread is safe.
        timer = threading.Timer(drain_delay_seconds, shut_down, args=(sig, None))
        timer.daemon = True
        pending.append(timer)
        timer.start()

    for sig in _SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for timer in pending:
            timer.cancel()
        for sig, original in previous.items():
            signal.signal(sig, original)


class DrainingMiddleware:
    """While the process drains, refuse new work (503, Retry-After, ``Connection: close``)."""

    def __init__(self, app: ASGIApp, is_draining: Callable[[Scope], bool]) -> None:
        self.app = app
        self._is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in _STILL_SERVED
            or not self._is_draining(scope)
        ):
            await self.app(scope, receive, send)
            return
        response = error_response(
            503,
            "The server is shutting down; retry on another replica.",
            type_="server_error",
            code="draining",
            headers={"Retry-After": "1", "Connection": "close"},
        )
        await response(scope, receive, send)


def draining_of(scope: Scope) -> bool:
    """Whether the app serving ``scope`` drains (False before its runtime exists)."""
    app: Any = scope.get("app")
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    return bool(getattr(runtime, "draining", False))
