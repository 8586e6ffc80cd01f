"""What a request must look like before anything reads it: a bounded number of headers, a
``Host`` the server answers to, and, on POST, a body type a web page cannot send unasked.

Without keys (the default on a laptop) any web page the user opens could drive the server:
``text/plain`` and form bodies need no CORS preflight, and after DNS rebinding a page's
requests reach ``127.0.0.1`` under the attacker's host name and may read the answers. So
(:class:`HostGuardMiddleware` before the key check, :class:`CrossSiteGuardMiddleware` after):

- ``Host`` must name an allowed host (``security.allowed_hosts``; by default the localhost
  names when the server is bound to loopback): a rebound name is refused (400).
- A POST with a body must be ``application/json`` (``multipart/form-data`` for file
  uploads): 415 otherwise. A browser cannot send JSON cross-site without a preflight, which
  nothing here answers. The official SDKs, LangChain and ``curl -H 'Content-Type:
  application/json'`` send it.
- A POST from a browser on another site (``Origin`` not an allowed host, or
  ``Sec-Fetch-Site: cross-site``) is refused (403), whatever its type.
- More than ``http.max_headers`` headers: 431.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedpipe.api.errors import error_response

LOCAL_HOSTS = ("localhost", ".localhost", "127.0.0.1", "::1")
_JSON = (b"application/json",)
_MULTIPART = (b"multipart/form-data",)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(configured: str, bind_host: str) -> tuple[str, ...]:
    """The Host names to accept: as configured, else the localhost names when bound to
    loopback, else any (``*``)."""
    given = tuple(part.strip().lower() for part in configured.split(",") if part.strip())
    if given:
        return given
    return LOCAL_HOSTS if is_loopback(bind_host) else ("*",)


@dataclass(frozen=True, slots=True)
class HostRule:
    patterns: tuple[str, ...]

    def allows(self, host: str) -> bool:
        name = _hostname(host)
        if name is None:
            return False
        for pattern in self.patterns:
            if pattern == "*" or name == pattern:
                return True
            if pattern.startswith(".") and (name.endswith(pattern) or name == pattern[1:]):
                return True
        return False


def _hostname(host: str) -> str | None:
    """``Host`` without its port, lower-cased (``[::1]:8000`` -> ``::1``); None if malformed."""
    try:
        parsed = urlsplit(f"//{host}")
        return (parsed.hostname or "").lower() or None
    except ValueError:
        return None


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    length = _header(headers, b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return _header(headers, b"transfer-encoding") is not None


def _refusal_response(status: int, message: str, code: str) -> Response:
    return error_response(status, message, type_="invalid_request_error", code=code)


class HostGuardMiddleware:
    """400 for a ``Host`` this server does not answer to, 431 past ``max_headers`` headers.
    Outside the key check: a rebound page gets nothing, key or not."""

    def __init__(self, app: ASGIApp, max_headers: int, hosts: HostRule) -> None:
        self.app = app
        self.max_headers = max_headers
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers: list[tuple[bytes, bytes]] = scope["headers"]
            refusal = None
            if len(headers) > self.max_headers:
                refusal = _refusal_response(
                    431,
                    f"The request has {len(headers)} headers; at most {self.max_headers} "
                    "are allowed.",
                    "too_many_headers",
                )
            else:
                host = _header(headers, b"host")
                if host is not None and not self.hosts.allows(host.decode("latin-1")):
                    refusal = _refusal_response(
                        400,
                        "This server does not answer to that Host name "
                        "(EMBEDPIPE_SECURITY__ALLOWED_HOSTS).",
                        "invalid_host",
                    )
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CrossSiteGuardMiddleware:
    """403 for a POST from another site, 415 for a POST body that is not JSON (multipart for
    uploads). Inside the key check, so a caller without a key learns only that (401)."""

    def __init__(
        self, app: ASGIApp, hosts: HostRule, multipart_paths: Collection[str] = ("/v1/files",)
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.multipart_paths = frozenset(multipart_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if _cross_site(headers, self.hosts):
            return _refusal_response(
                403, "Cross-site requests are not accepted.", "cross_site_request"
            )
        if not _has_body(headers):
            return None
        expected = _MULTIPART if scope["path"] in self.multipart_paths else _JSON
        given = (_header(headers, b"content-type") or b"").split(b";")[0].strip().lower()
        if given in expected:
            return None
        wanted = expected[0].decode()
        return _refusal_response(
            415,
            f"The body must be sent as {wanted} (Content-Type: {wanted}), "
            f"not {given.decode('latin-1') or 'without a Content-Type'}.",
            "unsupported_media_type",
        )


def _cross_site(headers: Sequence[tuple[bytes, bytes]], hosts: HostRule) -> bool:
    if _header(headers, b"sec-fetch-site") == b"cross-site":
        return True
    origin = _header(headers, b"origin")
    if origin is None or origin == b"null":
        return origin == b"null"  # sandboxed frames and file:// pages send "null"
    netloc = urlsplit(origin.decode("latin-1")).netloc
    own = _header(headers, b"host")
    if own is not None and netloc.lower() == own.decode("latin-1").lower():
        return False  # same origin: the dashboard, Swagger UI
    # A wildcard admits any Host, not any site: then only the same origin may POST.
    return "*" in hosts.patterns or not hosts.allows(netloc)
