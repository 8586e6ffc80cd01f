"""``EMBEDPIPE_CACHE__PER_TENANT``: each API key's vectors under its own cache namespace, so no
key can time another's cache hits. Off (the default), a text embedded by one key is a hit for
every other."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from embedpipe.settings import CacheSettings, Settings
from embedpipe.tenancy import serving_tenant, tenant_namespace
from tests.fakes import FakeEmbedder, fake_app

KEY_A = "sk-tenant-a-0123456789abcdef"
KEY_B = "sk-tenant-b-0123456789abcdef"


async def _cached(per_tenant: bool, tmp_path: Path) -> list[bool]:
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
    [(False, [False, True, True, True]), (True, [False, False, True, True])],
)
async def test_per_tenant_cache_namespaces(
    per_tenant: bool, expected: list[bool], tmp_path: Path
) -> None:
    assert await _cached(per_tenant, tmp_path) == expected


def test_a_tenants_namespace_hides_its_name() -> None:
    assert tenant_namespace("ep", None) == "ep"
    namespace = tenant_namespace("ep", "search-team")
    assert namespace.startswith("ep:t") and "search-team" not in namespace
    assert namespace != tenant_namespace("ep", "other-team")
    with serving_tenant("x"):
        pass  # restores the previous tenant on exit
