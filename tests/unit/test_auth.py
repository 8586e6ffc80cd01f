"""API keys: the key store, the keys file, and the middleware in front of every route."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from embedpipe.api.app import create_app
from embedpipe.api.cohere_errors import COHERE_PATHS
from embedpipe.api.security import OPEN_PATHS, client_address, parse_networks
from embedpipe.auth import KeysFileError, KeyStore, generate_key, hash_key, load_keys_file
from embedpipe.settings import SecuritySettings, Settings

KEY = "ep-test-key-0123456789"
OTHER = "ep-other-key-9876543210"
# The Host the application answers to when bound to loopback (TestClient's is "testserver").
LOCAL = "http://localhost"
JSON = {"content-type": "application/json"}


def test_hash_key_is_a_labelled_sha256() -> None:
    digest = hash_key("secret")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert digest == hash_key("secret") != hash_key("secret2")


def test_generated_keys_are_long_and_distinct() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(key.startswith("ep-") and len(key) >= 40 for key in keys)


def test_plain_keys_from_the_environment() -> None:
    store = KeyStore.load(f" {KEY} ,, {OTHER}", None)
    assert store.enabled and len(store) == 2
    first, second = store.authenticate(KEY), store.authenticate(OTHER)
    assert first is not None and second is not None
    assert first.name != second.name and first.name.startswith("key-")
    assert KEY not in first.name
    assert store.authenticate("ep-test-key") is None
    assert store.authenticate("") is None
    assert not KeyStore.load("", None).enabled


def test_every_stored_digest_is_compared_even_after_a_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    store = KeyStore.load(f"{KEY},{OTHER},third-key", None)
    assert store.authenticate(KEY) is not None
    assert len(calls) == 3


TOML = f"""
[[keys]]
name = "search-team"
hash = "{hash_key(KEY)}"
rpm = 600
tpm = 0

[[keys]]
name = "batch"
hash = "{hash_key(OTHER).upper().replace("SHA256:", "sha256:")}"
"""

YAML = f"""
keys:
  - name: search-team
    hash: "{hash_key(KEY)}"
    rpm: 600
    tpm: 0
  - name: batch
    hash: "{hash_key(OTHER)}"
"""


@pytest.mark.parametrize(("suffix", "text"), [(".toml", TOML), (".yaml", YAML), (".yml", YAML)])
def test_keys_file_holds_names_digests_and_limits(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"keys{suffix}"
    path.write_text(text)
    store = KeyStore.load("", path)
    team = store.authenticate(KEY)
    batch = store.authenticate(OTHER)
    assert team is not None and (team.name, team.rpm, team.tpm) == ("search-team", 600, 0)
    assert batch is not None and (batch.name, batch.rpm, batch.tpm) == ("batch", None, None)


def test_environment_keys_and_file_keys_together(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(TOML)
    store = KeyStore.load("third-key", path)
    assert len(store) == 3
    assert store.authenticate("third-key") is not None


BAD_FILES = [
    ("keys.toml", "[[keys]]\nname = 'a'\nkey = 'plain'\n", "store its digest"),
    ("keys.toml", "[[keys]]\nname = 'a'\nhash = 'md5:abc'\n", "'hash' must be"),
    ("keys.toml", "[[keys]]\nhash = 'sha256:" + "a" * 64 + "'\n", "'name' must be"),
    ("keys.toml", "[[keys]]\nname = 'a b'\nhash = 'sha256:" + "a" * 64 + "'\n", "'name'"),
    ("keys.toml", "[[keys]]\nname = 'a'\nhash = 'sha256:" + "a" * 64 + "'\nrpm = -1\n", "neg"),
    ("keys.toml", "[[keys]]\nname = 'a'\nhash = 'sha256:" + "a" * 64 + "'\nrpm = 'x'\n", "whole"),
    ("keys.toml", "[[keys]]\nname = 'a'\nhash = 'sha256:" + "a" * 64 + "'\nrole = 1\n", "unknown"),
    (
        "keys.toml",
        "[[keys]]\nname = 'a'\nhash = 'sha256:"
        + "a" * 64
        + "'\n[[keys]]\nname = 'a'\nhash = 'sha256:"
        + "b" * 64
        + "'\n",
        "used twice",
    ),
    ("keys.toml", "keys = 'nope'\n", "a list named 'keys'"),
    ("keys.toml", "[[keys]\n", "not valid TOML"),
    ("keys.yaml", "keys: [\n", "not valid YAML"),
    ("keys.yaml", "- a\n", "a list named 'keys'"),
    ("keys.json", "{}", "must end in"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES)
def test_a_bad_keys_file_stops_start_up_with_a_clear_message(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(KeysFileError, match=message):
        load_keys_file(path) if "twice" not in message else KeyStore.load("", path)


def test_a_missing_keys_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="cannot read"):
        KeyStore.load("", tmp_path / "absent.toml")


# --- the middleware, on the real application (no lifespan: nothing behind it is loaded) ---


def _app(tmp_path: Path, **overrides: Any) -> FastAPI:
    return create_app(Settings(api_keys=KEY, data_dir=tmp_path / "data", **overrides))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with_client = TestClient(_app(tmp_path), raise_server_exceptions=False, base_url=LOCAL)
    yield with_client
    with_client.close()


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) the application serves, included routers flattened."""
    found: list[tuple[str, str]] = []
    for route in app.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):  # an included router (FastAPI 0.16x keeps them nested)
            pairs = [(c.path, getattr(c.original_route, "methods", None)) for c in contexts()]
        else:
            pairs = [(getattr(route, "path", None), getattr(route, "methods", None))]
        found += [
            (method, re.sub(r"\{(\w+):\w+\}", r"{\1}", path))  # {model:path} -> {model}
            for path, methods in pairs
            if path
            for method in sorted(methods or ())
        ]
    return found


def test_no_route_answers_without_a_key_except_the_open_ones(tmp_path: Path) -> None:
    app = _app(tmp_path)
    client = TestClient(app, raise_server_exceptions=False, base_url=LOCAL)
    table = route_table(app)
    # The walk sees everything the API documents, and the API surfaces are all there.
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= set(table)
    paths = {path for _, path in table}
    assert {"/v1/embeddings", "/v1/models", "/embed", "/embed/batch", "/stats"} <= paths
    refused = 0
    for method, path in table:
        if path in OPEN_PATHS:
            continue
        for headers in ({}, {"Authorization": f"Bearer {OTHER}"}, {"X-API-Key": "nope"}):
            reply = client.request(method, _concrete(path), headers=headers)
            assert reply.status_code == 401, (method, path, headers, reply.text)
            refused += 1
            if path in COHERE_PATHS:  # Cohere's shape there (api/cohere_errors.py)
                assert set(reply.json()) == {"id", "message"}
                continue
            assert reply.json()["error"]["type"] == "authentication_error"
            assert reply.json()["error"]["code"] == "invalid_api_key"
    assert refused >= 3 * 6
    # Only liveness, readiness, metrics and the API docs (with their files) are open.
    assert {p for p in paths & OPEN_PATHS if not p.startswith("/docs/assets/")} <= {
        "/health",
        "/ready",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        "/redoc",
    }
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_unknown_paths_need_a_key_too(client: TestClient) -> None:
    assert client.get("/v1/nothing-here").status_code == 401
    assert client.post("/admin").status_code == 401
    found = client.get("/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert found.status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer   {KEY}  "},
        {"X-API-Key": KEY},
        {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": KEY},
    ],
)
def test_a_valid_key_passes(client: TestClient, headers: dict[str, str]) -> None:
    # Past the key check, an unknown route is a plain 404.
    assert client.get("/v1/nothing-here", headers=headers).status_code == 404


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "didn't provide an API key"),
        ({"Authorization": "Bearer"}, "didn't provide an API key"),
        ({"Authorization": f"Basic {KEY}"}, "didn't provide an API key"),
        ({"Authorization": f"Bearer {KEY}x"}, "Incorrect API key"),
        ({"X-API-Key": OTHER}, "Incorrect API key"),
        ({"Authorization": f"Bearer {OTHER}", "X-API-Key": KEY}, "Incorrect API key"),
    ],
)
def test_401_in_openais_envelope(
    client: TestClient,
    headers: dict[str, str],
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    reply = client.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=headers)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    assert reply.headers["x-request-id"]
    error = reply.json()["error"]
    assert message in error["message"]
    assert (error["type"], error["code"], error["param"]) == (
        "authentication_error",
        "invalid_api_key",
        None,
    )
    for secret in (KEY, OTHER):
        assert secret not in reply.text
        assert secret not in caplog.text


def test_open_paths_stay_open_and_metrics_can_be_protected(tmp_path: Path) -> None:
    client = TestClient(_app(tmp_path), raise_server_exceptions=False, base_url=LOCAL)
    assert client.get("/metrics").status_code == 200
    assert client.get("/health").status_code == 200
    protected = TestClient(
        _app(tmp_path, security=SecuritySettings(protect_metrics=True)),
        raise_server_exceptions=False,
        base_url=LOCAL,
    )
    assert protected.get("/metrics").status_code == 401
    assert protected.get("/health").status_code == 200
    assert protected.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200


def test_an_unauthenticated_body_is_never_read(client: TestClient) -> None:
    # 401, not 413: the key is checked before the body limit reads anything.
    reply = client.post("/v1/embeddings", content=b"x" * (17 * 1024 * 1024), headers=JSON)
    assert reply.status_code == 401


def test_without_keys_everything_is_open(tmp_path: Path) -> None:
    client = TestClient(
        create_app(Settings(data_dir=tmp_path)), raise_server_exceptions=False, base_url=LOCAL
    )
    assert client.get("/v1/nothing-here").status_code == 404


# --- who the client is when there are no keys ---


def _scope(peer: str, *forwarded: str) -> dict[str, object]:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return {"type": "http", "client": (peer, 5000), "headers": headers}


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.9", ["1.2.3.4"], "", "203.0.113.9"),  # no proxies trusted
        ("203.0.113.9", ["1.2.3.4"], "10.0.0.0/8", "203.0.113.9"),  # peer is no proxy
        ("10.0.0.2", [], "10.0.0.0/8", "10.0.0.2"),  # a proxy without the header
        ("10.0.0.2", ["1.2.3.4"], "10.0.0.0/8", "1.2.3.4"),
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4"], "10.0.0.0/8", "1.2.3.4"),  # spoofed hop ignored
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4, 10.0.0.7"], "10.0.0.0/8", "1.2.3.4"),  # two proxies
        ("10.0.0.2", ["6.6.6.6", "1.2.3.4"], "10.0.0.0/8", "1.2.3.4"),  # several headers
        ("10.0.0.2", ["10.0.0.5, 10.0.0.7"], "10.0.0.0/8", "10.0.0.5"),  # all proxies
        ("::1", ["2001:db8::1"], "::1", "2001:db8::1"),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(
    peer: str, forwarded: list[str], trusted: str, expected: str
) -> None:
    assert client_address(_scope(peer, *forwarded), parse_networks(trusted)) == expected


def test_a_bad_trusted_proxy_entry_is_named() -> None:
    with pytest.raises(ValueError, match="not-an-ip"):
        parse_networks("10.0.0.0/8, not-an-ip")


def test_websockets_are_refused_without_a_key(client: TestClient) -> None:
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/v1/stream"):
        pass
    assert refused.value.code == 1008


# --- `embedpipe keys generate` writes only what a keys file may hold ---


@pytest.mark.parametrize(
    "name",
    ['ops"\nrpm = 0\ntpm = 0\n[[keys]]\nname = "x', "a b", "", "x" * 65, "tab\tname", 'q"'],
)
def test_keys_generate_refuses_a_name_that_could_inject_toml(name: str) -> None:
    from typer.testing import CliRunner

    from embedpipe.cli import app

    result = CliRunner().invoke(app, ["keys", "generate", "--name", name, "--rpm", "5"])
    assert result.exit_code == 2, result.output
    assert "[[keys]]" not in result.stdout


def test_keys_generate_writes_an_entry_the_keys_file_reads(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from embedpipe.cli import app

    result = CliRunner().invoke(app, ["keys", "generate", "--name", "team-a@prod", "--rpm", "5"])
    assert result.exit_code == 0, result.output
    keys = tmp_path / "keys.toml"
    keys.write_text(result.stdout)
    (entry,) = load_keys_file(keys)
    assert (entry.name, entry.rpm, entry.tpm) == ("team-a@prod", 5, None)


# --- /stats: paths and every tenant's traffic for admin keys only ---


async def test_stats_shows_paths_and_traffic_to_admin_keys_only(tmp_path: Path) -> None:
    from tests.fakes import fake_app

    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "ops"\nhash = "{hash_key("k-ops")}"\n'
        f'[[keys]]\nname = "tenant"\nhash = "{hash_key("k-tenant")}"\n'
    )
    settings = Settings(
        data_dir=tmp_path / "data",
        api_keys_file=keys,
        security=SecuritySettings(admin_keys="ops"),
    )
    app, runtime = fake_app(settings)
    views: list[dict[str, Any]] = []
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as client:
            for key in ("k-tenant", "k-ops"):
                reply = await client.get("/stats", headers={"X-API-Key": key})
                assert reply.status_code == 200, reply.text
                views.append(reply.json())
    finally:
        await runtime.close()
    tenant, admin = views
    assert {"traffic", "cache", "rate_limited", "upstream", "queue_depth"} <= set(admin)
    assert "source" in admin["models"][0]
    assert set(tenant) == {"version", "models", "default_model"}
    assert tenant["models"][0]["name"] == "fake" and "source" not in tenant["models"][0]
