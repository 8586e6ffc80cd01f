"""The OpenAPI document, corrected to say what the service really answers.

FastAPI documents a 422 ``HTTPValidationError`` for every route with parameters; our error
handlers answer those mistakes with a 400 in OpenAI's envelope. And the key check runs in a
middleware before any route, so FastAPI knows nothing of it: with keys configured every
operation outside the open paths gets its 401 and the two ways to present a key
(``Authorization: Bearer`` or ``X-API-Key``), which Swagger UI's "Authorize" button and API
fuzzers both read.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from embedpipe.api.cohere_errors import COHERE_PATHS
from embedpipe.api.schemas import CohereErrorBody, ErrorBody
from embedpipe.api.security import OPEN_PATHS

_REF_TEMPLATE = "#/components/schemas/{model}"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
# Cohere's routes answer every error in Cohere's shape (api/cohere_errors.py).
_COHERE_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/CohereErrorBody"}}}
_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Your API key."},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def correct(document: dict[str, Any], *, auth: bool) -> dict[str, Any]:
    """``document`` (FastAPI's) with our 400s for its 422s and, when ``auth``, the key
    requirement and its 401 on every operation outside the open paths. Changed in place."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorBody.model_json_schema(ref_template=_REF_TEMPLATE)
    for name, schema in error_schema.pop("$defs", {}).items():
        schemas.setdefault(name, schema)
    schemas.setdefault("ErrorBody", error_schema)
    schemas.setdefault("CohereErrorBody", CohereErrorBody.model_json_schema())
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _HTTP_METHODS:
                continue
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = _error("Invalid parameters or body.")
            if method == "post":  # api/request_guard.py answers these before any route
                responses.setdefault("403", _error("A POST from another site."))
                if "requestBody" in operation:
                    responses.setdefault("415", _error("A body not sent as the type it takes."))
            if auth and path not in OPEN_PATHS:
                responses.setdefault("401", _error("A missing or unknown API key."))
                operation["security"] = [{name: []} for name in _SECURITY_SCHEMES]
            if path in COHERE_PATHS:
                for status, response in responses.items():
                    if status.startswith(("4", "5")):
                        response["content"] = _COHERE_ERROR
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if auth:
        components["securitySchemes"] = dict(_SECURITY_SCHEMES)
    return document


def install_openapi(app: FastAPI, *, auth: bool) -> None:
    """Serve the corrected document at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = correct(FastAPI.openapi(app), auth=auth)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
