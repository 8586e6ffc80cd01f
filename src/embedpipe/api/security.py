"""The HTTP side of protection: API keys, who the client is, and rate-limit answers.

Keys are checked by an ASGI middleware before routing, deny by default: when keys are
configured every path needs one except an explicit open list (``/health``, ``/ready``, the API
docs and, unless ``security.protect_metrics``, ``/metrics``). A route added later is protected
without anyone having to remember it, and an unknown path answers 401, not a map of the routes.

The routes that cost work charge the client's budgets in two steps: :func:`admit_request`
(one request, one token) before the body is read, then :func:`charge_tokens` once the tokens
are counted. Either answers 429 (``Retry-After``, OpenAI's ``x-ratelimit-*`` headers); the
second, 400 for a request that can never fit the token budget; both, 503 when the limiter's
storage is down and it is configured to fail closed. Successful answers carry the same
``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from embedpipe import logs, metrics
from embedpipe.api.docs import DOCS_PATHS
from embedpipe.api.errors import error_response
from embedpipe.auth import ApiKey, KeyStore
from embedpipe.errors import InvalidInput
from embedpipe.ratelimit import Decision, LimiterUnavailable, Quota
from embedpipe.runtime import Runtime
from embedpipe.settings import Settings
from embedpipe.tenancy import set_tenant

log = logging.getLogger("embedpipe.security")

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"}) | DOCS_PATHS
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MISSING = (
    "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' or "
    "'X-API-Key: YOUR_KEY'."
)
_INVALID = "Incorrect API key provided."


@dataclass(frozen=True, slots=True)
class Client:
    """Who is calling: ``key:<name>`` with auth on, else ``ip:<address>``; budgets are per id."""

    id: str
    key: ApiKey | None = None


def parse_networks(value: str) -> tuple[_Network, ...]:
    """``10.0.0.0/8,127.0.0.1`` -> networks; a ValueError names a bad entry."""
    networks = []
    for part in (p.strip() for p in value.split(",")):
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError as exc:
                raise ValueError(f"not an address or network: {part!r}") from exc
    return tuple(networks)


def _trusted(address: str, networks: Sequence[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(scope: Scope, trusted: Sequence[_Network]) -> str:
    """The client's address: the peer's, or from X-Forwarded-For when the peer is a trusted
    proxy (the rightmost hop that is not a trusted proxy: a client can prepend hops, only the
    proxies append them)."""
    peer = scope.get("client")
    address: str = peer[0] if peer else "unknown"
    if not trusted or not _trusted(address, trusted):
        return address
    hops = [
        hop.strip()
        for name, value in scope["headers"]
        if name == b"x-forwarded-for"
        for hop in value.decode("latin-1").split(",")
    ]
    for hop in reversed([hop for hop in hops if hop]):
        address = hop[:64]
        if not _trusted(hop, trusted):
            break
    return address


def _presented_key(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    bearer: str | None = None
    api_key: str | None = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                bearer = credentials.strip()
        elif name == b"x-api-key" and value.strip():
            api_key = value.decode("latin-1").strip()
    return bearer or api_key


class AuthMiddleware:
    """401 in OpenAI's envelope for a missing or wrong key; the caller's :class:`Client` goes
    into ``scope["state"]["client"]`` for the rate limiter. Keys are never logged."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        trusted_proxies: Sequence[_Network] = (),
        protect_metrics: bool = False,
    ) -> None:
        self.app = app
        self.keys = keys
        self.trusted_proxies = tuple(trusted_proxies)
        self.open_paths = OPEN_PATHS - {"/metrics"} if protect_metrics else OPEN_PATHS

    def is_open(self, path: str) -> bool:
        return not self.keys.enabled or path in self.open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        address = client_address(scope, self.trusted_proxies)
        client = Client(f"ip:{address}")
        set_tenant(None)
        if not self.is_open(scope["path"]):
            presented = _presented_key(scope["headers"])
            key = self.keys.authenticate(presented) if presented is not None else None
            if key is None:
                # The access log line has the 401 already; this says why (never the key).
                log.debug(
                    "refused %s from %s: %s API key",
                    scope["path"],
                    address,
                    "no" if presented is None else "an unknown",
                )
                if scope["type"] == "websocket":  # none today; deny by default all the same
                    await send({"type": "websocket.close", "code": 1008})
                    return
                response = error_response(
                    401,
                    _MISSING if presented is None else _INVALID,
                    type_="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
            client = Client(f"key:{key.name}", key)
            logs.annotate(key=key.name)
            set_tenant(key.name)
        scope.setdefault("state", {})["client"] = client
        await self.app(scope, receive, send)


class Refused(Exception):
    """A request the limiter turned away, with its answer ready (handled below)."""

    def __init__(
        self, status: int, message: str, type_: str, code: str, headers: dict[str, str]
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type_ = type_
        self.code = code
        self.headers = headers


def _refused(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return error_response(
        exc.status, exc.message, type_=exc.type_, code=exc.code, headers=exc.headers
    )


def quota_for(client: Client, settings: Settings) -> Quota:
    """The client's budgets: its key's own, else the server's defaults."""
    key = client.key
    rpm = key.rpm if key is not None and key.rpm is not None else settings.rate_limit_rpm
    tpm = key.tpm if key is not None and key.tpm is not None else settings.rate_limit_tpm
    return Quota(requests=rpm, tokens=tpm)


def _duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format: ``20ms``, ``1.5s``, ``6m0s``."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    for window in decision.windows:
        headers[f"x-ratelimit-limit-{window.kind}"] = str(window.limit)
        headers[f"x-ratelimit-remaining-{window.kind}"] = str(window.remaining)
        headers[f"x-ratelimit-reset-{window.kind}"] = _duration(window.reset_seconds)
    if not decision.allowed:
        retry_after = decision.retry_after
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(max(1, math.ceil(retry_after * 1000)))
    return headers


@dataclass(frozen=True, slots=True)
class Admission:
    """A request charged its request slot (and one token) by :func:`admit_request`; its
    tokens follow with :func:`charge_tokens` once counted."""

    client: Client
    quota: Quota
    headers: dict[str, str]
    prepaid_tokens: int


async def _acquire(runtime: Runtime, client: Client, quota: Quota, tokens: int) -> Decision:
    try:
        return await runtime.limiter.acquire(client.id, quota, tokens)
    except LimiterUnavailable as exc:
        retry = max(1, math.ceil(runtime.limiter.retry_seconds))
        raise Refused(
            503,
            "The rate limiter is unavailable; try again shortly.",
            "service_unavailable",
            "rate_limiter_unavailable",
            {"Retry-After": str(retry)},
        ) from exc


def _too_many(client: Client, decision: Decision, requested: dict[str, int]) -> Refused:
    detail = "; ".join(
        f"{w.kind} per minute: limit {w.limit}, remaining {w.remaining}, requested "
        f"{requested[w.kind]}"
        for w in decision.windows
        if w.exceeded
    )
    name = client.key.name if client.key is not None else client.id.removeprefix("ip:")
    return Refused(
        429,
        f"Rate limit reached for {name}: {detail}. Please try again in "
        f"{_duration(decision.retry_after)}.",
        "rate_limit_error",
        "rate_limit_exceeded",
        rate_limit_headers(decision),
    )


async def admit_request(request: Request, runtime: Runtime) -> Admission:
    """Charge one request (and one token, the least any request costs) to the client's
    budgets before its body is read, parsed or tokenized: a client over its budget is refused
    for the price of one counter, and every request that costs work has paid its slot."""
    client: Client = getattr(request.state, "client", None) or Client(
        f"ip:{request.client.host if request.client else 'unknown'}"
    )
    quota = quota_for(client, runtime.settings)
    prepaid = 1 if quota.tokens else 0
    decision = await _acquire(runtime, client, quota, prepaid)
    if not decision.allowed:
        raise _too_many(client, decision, {"requests": 1, "tokens": prepaid})
    return Admission(client, quota, rate_limit_headers(decision), prepaid)


async def charge_tokens(
    admission: Admission, runtime: Runtime, tokens: int, *, param: str
) -> dict[str, str]:
    """Charge the rest of this request's ``tokens``, or refuse it (its request slot stays
    spent). Returns the ``x-ratelimit-*`` headers for the answer. ``param``: the field
    holding the texts, named in a 400."""
    budget = admission.quota.tokens
    if 0 < budget < tokens:
        raise InvalidInput(
            f"This request holds {tokens} tokens, more than the {budget} tokens per minute "
            "this client may send: it can never be served. Send fewer or shorter texts.",
            param=param,
            code="tokens_exceed_rate_limit",
        )
    rest = tokens - admission.prepaid_tokens
    if not budget or rest <= 0:
        return admission.headers
    decision = await _acquire(runtime, admission.client, Quota(requests=0, tokens=budget), rest)
    if not decision.allowed:
        refused = _too_many(admission.client, decision, {"tokens": tokens})
        refused.headers = {**admission.headers, **refused.headers}
        raise refused
    return {**admission.headers, **rate_limit_headers(decision)}


def install_security(app: FastAPI, settings: Settings) -> KeyStore:
    """Add the key check and the refusal handler; reads the keys file (errors stop start-up)."""
    keys = KeyStore.load(settings.api_keys, settings.api_keys_file)
    app.add_middleware(
        AuthMiddleware,
        keys=keys,
        trusted_proxies=parse_networks(settings.security.trusted_proxies),
        protect_metrics=settings.security.protect_metrics,
    )
    app.add_exception_handler(Refused, _refused)
    limits = {
        "requests": settings.rate_limit_rpm or any(k.rpm for k in keys),
        "tokens": settings.rate_limit_tpm or any(k.tpm for k in keys),
    }
    metrics.start_at_zero(limits=[limit for limit, in_force in limits.items() if in_force])
    limited = any(limits.values())
    if limited and settings.workers > 1 and not settings.redis_url:
        log.warning(
            "rate limits are held in each of the %d worker processes (no EMBEDPIPE_REDIS_URL): "
            "a client may get up to %d times its budget",
            settings.workers,
            settings.workers,
        )
    log.info(
        "authentication %s (%d key(s)); rate limits per client: %s rpm, %s tpm",
        "on" if keys.enabled else "off",
        len(keys),
        settings.rate_limit_rpm or "no",
        settings.rate_limit_tpm or "no",
    )
    return keys
