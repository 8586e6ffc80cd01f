"""``/docs`` and ``/redoc`` load nothing from elsewhere: their scripts and styles are files of
the pinned ``fastapi-offline`` package, served by this server."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.testclient import TestClient

from embedpipe.api.app import create_app
from embedpipe.settings import Settings

_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)""")


def test_the_docs_pages_load_only_this_servers_files(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", api_keys="k-docs"))
    client = TestClient(app, base_url="http://localhost")
    for page in ("/docs", "/redoc"):
        reply = client.get(page)  # open without a key, like /openapi.json
        assert reply.status_code == 200
        html = reply.text
        assert "https://" not in html and "http://" not in html, html
        urls = [a or b for a, b in _URL.findall(html)]
        assert urls and all(url.startswith("/docs/assets/") for url in urls), urls
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in script.content
    assert client.get("/docs/assets/../secrets").status_code in (401, 404)
