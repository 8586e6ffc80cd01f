"""``EMBEDPIPE_CACHE__PER_TENANT``: each API key's vectors under its own cache namespace, so no
key learns what another embedded (``cached``, ``cached_count``, the time of a hit). On by
default with more than one key; off, a text embedded by one key is a hit for every other."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from embedpipe.settings import CacheSettings, Settings
from embedpipe.tenancy import cache_per_tenant, serving_tenant, tenant_namespace
from tests.fakes import FakeEmbedder, fake_app

KEY_A = "sk-tenant-a-0123456789abcdef"
KEY_B = "sk-tenant-b-0123456789abcdef"


async def _cached(per_tenant: bool | None, tmp_path: Path) -> list[bool]:
    settings = Settings(
        data_dir=tmp_path / "data",
        api_keys=f"{KEY_A},{KEY_B}",
        cache=CacheSettings(per_tenant=per_tenant),
    )
    embedder = FakeEmbedder()
    app, runtime = fake_app(settings, embedder)
    answers = []
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            for key in (KEY_A, KEY_B, KEY_A, KEY_B):
                reply = await client.post(
                    "/embed",
                    json={"text": "the same text for everyone", "model": "fake"},
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert reply.status_code == 200, reply.text
                answers.append(reply.json()["cached"])
    finally:
        await runtime.close()
    return answers


@pytest.mark.parametrize(
    ("per_tenant", "expected"),
    [
        (None, [False, False, True, True]),  # the default, with two keys
        (True, [False, False, True, True]),
        (False, [False, True, True, True]),  # shared on request: B learns what A embedded
    ],
)
async def test_per_tenant_cache_namespaces(
    per_tenant: bool | None, expected: list[bool], tmp_path: Path
) -> None:
    assert await _cached(per_tenant, tmp_path) == expected


async def test_by_default_the_batch_route_tells_no_key_what_another_embedded(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_keys=f"{KEY_A},{KEY_B}")
    app, runtime = fake_app(settings)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            body = {"texts": ["a secret plan", "another"], "model": "fake"}
            counts = []
            for key in (KEY_A, KEY_B):
                reply = await client.post(
                    "/embed/batch", json=body, headers={"Authorization": f"Bearer {key}"}
                )
                assert reply.status_code == 200, reply.text
                counts.append(reply.json()["cached_count"])
    finally:
        await runtime.close()
    assert counts == [0, 0]


def test_the_default_depends_on_how_many_keys(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert cache_per_tenant(Settings(data_dir=data)) is False
    assert cache_per_tenant(Settings(data_dir=data, api_keys="k1")) is False
    assert cache_per_tenant(Settings(data_dir=data, api_keys="k1,k2")) is True
    shared = CacheSettings(per_tenant=False)
    assert cache_per_tenant(Settings(data_dir=data, api_keys="k1,k2", cache=shared)) is False


def test_a_tenants_namespace_hides_its_name() -> None:
    assert tenant_namespace("ep", None) == "ep"
    namespace = tenant_namespace("ep", "search-team")
    assert namespace.startswith("ep:t") and "search-team" not in namespace
    assert namespace != tenant_namespace("ep", "other-team")
    with serving_tenant("x"):
        pass  # restores the previous tenant on exit
