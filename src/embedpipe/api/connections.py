"""Connection-level guards that uvicorn lacks: a deadline and a size bound for a request's
head, and caps on open connections (in all, and per client address).

uvicorn bounds a connection only once it has answered a request (``timeout_keep_alive``): a
client that opens a socket and never finishes its request line and headers (slowloris, or
just idle sockets) holds it, and a file descriptor, for ever; and its httptools protocol reads
a head of any size (rebuilding a long header value on every chunk: 27 s of CPU for one 157 MB
header). The protocols here are uvicorn's own with these additions:

- a request's head (request line + headers) must arrive whole within ``head_timeout`` of the
  connection opening or of the previous answer, else 408 and the connection is closed;
- a head longer than ``max_head_bytes`` gets 431 and the connection is closed, before the
  parser sees more of it (h11 does this itself: ``h11_max_incomplete_event_size``);
- past ``max_connections`` open connections a new one gets 503 and is closed at once, before
  any byte is read, so the process never runs out of file descriptors;
- past ``max_per_client`` connections from one address (trusted proxies exempt) likewise, so
  one client cannot take them all.

``serve`` uses the httptools one: it costs a third less server CPU per request than h11 on the
cache-hit path (``benchmarks/http_parsers.py``). The header count is checked per request
(:mod:`embedpipe.api.request_guard`).
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
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from embedpipe.settings import Settings

log = logging.getLogger("embedpipe.connections")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    head_timeout: float
    max_connections: int
    max_per_client: int  # 0 = no per-client cap
    exempt: tuple[_Network, ...] = ()
    max_head_bytes: int = 64 * 1024


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


class _Guard(asyncio.Protocol):
    """The deadline and the caps, shared by both protocols (mixed in before uvicorn's, so
    ``super()`` here is uvicorn's protocol)."""

    limits: ConnectionLimits
    _head_timer: asyncio.TimerHandle | None
    # uvicorn's protocol attributes
    client: tuple[str, int] | None
    connections: set[Any]
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._admit(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _admit(self, transport: asyncio.Transport) -> bool:
        """False (and a 503 sent) when this new connection is over a cap."""
        refusal = self._over_cap()
        if refusal is None:
            self._arm_head_timer()
            return True
        log.warning("refused a connection from %s: %s", self._peer(), refusal)
        transport.write(_refusal(503, "Service Unavailable"))
        transport.close()
        return False

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

    def _awaiting_head(self) -> bool:
        raise NotImplementedError

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head():
            return
        log.info("closed a connection from %s: no request head within the deadline", self._peer())
        self._refuse(408, "Request Timeout")

    def _refuse(self, status: int, reason: str) -> None:
        self.transport.write(_refusal(status, reason))
        self.transport.close()


class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size bound and connection
    caps (see the module)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_timer = None
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._heads = 0  # heads parsed on this connection

    def data_received(self, data: bytes) -> None:
        heads, in_head = self._heads, self._in_head
        super().data_received(data)
        # Counted after the parser saw the chunk, when it held nothing but an unfinished
        # head: one that completes a head, or a body, never counts.
        if in_head and self._in_head and self._heads == heads and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                log.info("closed a connection from %s: request head too large", self._peer())
                self._refuse(431, "Request Header Fields Too Large")

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._heads += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def _awaiting_head(self) -> bool:
        # A request being answered is not a late head, even though its body is all in.
        return self._in_head and (self.cycle is None or self.cycle.response_complete)


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with a head deadline and connection caps (h11 bounds the head's
    size itself); see the module."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's head has the same deadline, from now.
        if not self.transport.is_closing():
            self._arm_head_timer()

    def _awaiting_head(self) -> bool:
        # IDLE: no complete request head since the timer was armed.
        return self.conn.their_state is h11.IDLE


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
    """uvicorn's options for this service: the guarded httptools protocol, head size and
    keep-alive limits, and uvicorn's proxy headers off.

    uvicorn's proxy-headers middleware trusts 127.0.0.1 by default and rewrites the client
    before the rate limiter sees it: ``security.trusted_proxies`` is the only judge here.
    """
    from embedpipe.api.security import parse_networks

    http = settings.http
    cap = connection_cap(http.max_connections)
    limits = ConnectionLimits(
        head_timeout=http.head_timeout_seconds,
        max_connections=cap,
        max_per_client=http.max_connections_per_client or max(1, cap // 4),
        exempt=parse_networks(settings.security.trusted_proxies),
        max_head_bytes=http.max_header_bytes,
    )
    return {
        # A partial of a module-level class pickles, for the worker processes of --workers.
        "http": functools.partial(GuardedHttpToolsProtocol, limits=limits),
        "h11_max_incomplete_event_size": http.max_header_bytes,
        "timeout_keep_alive": http.keep_alive_timeout_seconds,
        "proxy_headers": False,
    }
