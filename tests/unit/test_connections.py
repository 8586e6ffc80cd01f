"""The options ``embedpipe serve`` hands uvicorn (the attacks themselves run against a real
server in tests/reliability/test_http_hardening.py)."""

from __future__ import annotations

from pathlib import Path

from embedpipe.api.connections import GuardedHttpToolsProtocol, server_options
from embedpipe.settings import HttpSettings, SecuritySettings, Settings


def test_serve_options(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        http=HttpSettings(max_connections=400, head_timeout_seconds=3, max_header_bytes=8192),
        security=SecuritySettings(trusted_proxies="10.0.0.0/8"),
    )
    options = server_options(settings)
    # uvicorn's proxy headers off: X-Forwarded-For is judged by trusted_proxies alone.
    assert options["proxy_headers"] is False
    assert options["http"].func is GuardedHttpToolsProtocol
    limits = options["http"].keywords["limits"]
    assert (limits.max_connections, limits.max_per_client) == (400, 100)  # a quarter
    assert (limits.head_timeout, limits.max_head_bytes) == (3, 8192)
    assert [str(network) for network in limits.exempt] == ["10.0.0.0/8"]
    own = Settings(data_dir=tmp_path, http=HttpSettings(max_connections_per_client=7))
    assert server_options(own)["http"].keywords["limits"].max_per_client == 7
