"""The API docs (``/docs``: Swagger UI, ``/redoc``: ReDoc) served from this process.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, without integrity hashes: whoever
controls the CDN (or the path to it) runs script on the docs page, with the user's key in its
"Authorize" box. Here the pages load the files the ``fastapi-offline`` package ships, from
this server, and nothing else (no fonts, no favicon from elsewhere).
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

ASSET_PREFIX = "/docs/assets/"
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
ASSET_PATHS = frozenset(ASSET_PREFIX + name for name in _ASSETS)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"}) | ASSET_PATHS


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("fastapi_offline").joinpath("static", name).read_bytes()


def install_docs(app: FastAPI, title: str) -> None:
    """Routes for the docs pages and their files. Build the app with ``docs_url=None`` and
    ``redoc_url=None``, so FastAPI's CDN pages are not there too."""

    async def swagger_ui(_: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} - Swagger UI",
            swagger_js_url=ASSET_PREFIX + "swagger-ui-bundle.js",
            swagger_css_url=ASSET_PREFIX + "swagger-ui.css",
            swagger_favicon_url=ASSET_PREFIX + "favicon.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    async def oauth2_redirect(_: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(_: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{title} - ReDoc",
            redoc_js_url=ASSET_PREFIX + "redoc.standalone.js",
            redoc_favicon_url=ASSET_PREFIX + "favicon.png",
            with_google_fonts=False,
        )

    app.add_route("/docs", swagger_ui, include_in_schema=False)
    app.add_route("/docs/oauth2-redirect", oauth2_redirect, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)
    for name, media_type in _ASSETS.items():

        async def asset(_: Request, name: str = name, media_type: str = media_type) -> Response:
            return Response(
                _asset(name),
                media_type=media_type,
                headers={"Cache-Control": "public, max-age=86400"},
            )

        app.add_route(ASSET_PREFIX + name, asset, include_in_schema=False)
