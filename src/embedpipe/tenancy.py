"""Whose request this is, for a cache namespaced per tenant (``EMBEDPIPE_CACHE__PER_TENANT``).

A cache hit answers faster than a miss, so a caller could learn whether anyone embedded a given
text lately. Operators who must rule that out between tenants turn on per-tenant namespaces:
each API key's vectors then live under its own cache keys. The tenant is request-scoped state
(a context variable, like the access log's fields): the auth middleware sets it for the
request, a batch chunk for its batch's owner; nothing else has to pass it along.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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
