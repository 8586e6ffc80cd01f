"""Connection-level guards that uvicorn lacks: a deadline for a request's head, and caps on
open connections (in all, and per client address).

uvicorn bounds a connection only once it has answered a request (``timeout_keep_alive``): a
client that opens a socket and never finishes its request line and headers (slowloris, or
just idle sockets) holds it, and a file descriptor, for ever. :class:`GuardedH11Protocol` is
uvicorn's h11 protocol with three additions:

- a request's head (request line + headers) must arrive whole within ``head_timeout`` of the
  connection opening or of the previous answer, else the connection is closed (408);
- past ``max_connections`` open connections a new one gets 503 and is closed at once, before
  any byte is read, so the process never runs out of file descriptors;
- past ``max_per_client`` connections from one address (trusted proxies exempt) likewise, so
  one client cannot take them all.

The head's size is bounded by h11 itself (``h11_max_incomplete_event_size``, passed by
``serve``): h11 finds the end of the head in linear time and refuses a longer one with 400.
The header count is checked per request (:mod:`embedpipe.api.request_guard`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from embedpipe.settings import Settings

log = logging.getLogger("embedpipe.connections")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    head_timeout: float
    max_connections: int
    max_per_client: int  # 0 = no per-client cap
    exempt: tuple[_Network, ...] = ()


def connection_cap(configured: int) -> int:
    """``configured``, or (0) three quarters of this process's open-file limit: the rest stays
    for the model, the data dir, Redis and the listening socket."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, soft * 3 // 4)


def _refusal(status: int, reason: str) -> bytes:
    body = reason.encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline and connection caps (see the module)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        refusal = self._over_cap()
        if refusal is not None:
            log.warning("refused a connection from %s: %s", self._peer(), refusal)
            transport.write(_refusal(503, "Service Unavailable"))
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's head has the same deadline, from now (pipelined requests that
        # are already parsed are not IDLE, so the timer leaves them alone).
        if not self.transport.is_closing():
            self._arm_head_timer()

    def _peer(self) -> str:
        return self.client[0] if self.client else "unknown"

    def _over_cap(self) -> str | None:
        limits = self.limits
        if len(self.connections) > limits.max_connections:
            return f"more than {limits.max_connections} connections open"
        if limits.max_per_client and not _exempt(self._peer(), limits.exempt):
            peer = self.client[0] if self.client else None
            same = sum(1 for other in self.connections if _host(other) == peer)
            if same > limits.max_per_client:
                return f"more than {limits.max_per_client} connections from this address"
        return None

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # IDLE: no complete request head since the timer was armed (a request being read or
        # answered has moved h11 past IDLE).
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        log.info("closed a connection from %s: no request head within the deadline", self._peer())
        self.transport.write(_refusal(408, "Request Timeout"))
        self.transport.close()


def _host(protocol: object) -> str | None:
    client = getattr(protocol, "client", None)
    return client[0] if client else None


def _exempt(address: str, networks: Sequence[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for this service: the guarded h11 protocol, head size and keep-alive
    limits, and uvicorn's proxy headers off.

    h11 over httptools: httptools has no limit on a head's size and rebuilds a long header
    value on every chunk (quadratic in its length: 27 s of CPU for one 157 MB header); h11
    stops at ``max_header_bytes`` in linear time (see ``benchmarks/http_parsers.py``).
    uvicorn's proxy-headers middleware trusts 127.0.0.1 by default and rewrites the client
    before the rate limiter sees it: ``security.trusted_proxies`` is the only judge here.
    """
    from embedpipe.api.security import parse_networks

    http = settings.http
    limits = ConnectionLimits(
        head_timeout=http.head_timeout_seconds,
        max_connections=connection_cap(http.max_connections),
        max_per_client=http.max_connections_per_client,
        exempt=parse_networks(settings.security.trusted_proxies),
    )
    return {
        # A partial of a module-level class pickles, for the worker processes of --workers.
        "http": functools.partial(GuardedH11Protocol, limits=limits),
        "h11_max_incomplete_event_size": http.max_header_bytes,
        "timeout_keep_alive": http.keep_alive_timeout_seconds,
        "proxy_headers": False,
    }
