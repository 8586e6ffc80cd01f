"""Whose request this is, for a cache namespaced per tenant (``EMBEDPIPE_CACHE__PER_TENANT``).

A cache hit answers faster than a miss, and ``/embed``'s ``cached`` flag and ``/embed/batch``'s
``cached_count`` say so outright, so a shared cache tells any caller whether anyone embedded a
given text lately. With more than one API key, each key's vectors therefore live under its own
cache keys by default (``EMBEDPIPE_CACHE__PER_TENANT=false`` shares them, and that knowledge).
The tenant is request-scoped state (a context variable, like the access log's fields): the auth
middleware sets it for the request, a batch chunk for its batch's owner; nothing else has to
pass it along.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from embedpipe.auth import KeyStore
from embedpipe.settings import Settings

_TENANT: ContextVar[str | None] = ContextVar("embedpipe_tenant", default=None)


def current_tenant() -> str | None:
    return _TENANT.get()


def set_tenant(tenant: str | None) -> None:
    """For the rest of this request's context (an ASGI middleware's call to the app)."""
    _TENANT.set(tenant)


@contextmanager
def serving_tenant(tenant: str | None) -> Iterator[None]:
    token = _TENANT.set(tenant)
    try:
        yield
    finally:
        _TENANT.reset(token)


def tenant_namespace(namespace: str, tenant: str | None) -> str:
    """The cache namespace of ``tenant``: a digest of the key's name, never the name itself."""
    if tenant is None:
        return namespace
    return f"{namespace}:t{hashlib.sha256(tenant.encode()).hexdigest()[:12]}"


def cache_per_tenant(settings: Settings) -> bool:
    """Whether each key gets its own cache namespace: as configured, else (None) when more
    than one key is configured (one key, or none, has no one to hide from)."""
    if settings.cache.per_tenant is not None:
        return settings.cache.per_tenant
    return len(KeyStore.load(settings.api_keys, settings.api_keys_file)) > 1
