"""OpenAI's Files and Batch API for ``endpoint: "/v1/embeddings"``.

``client.files.create(purpose="batch")``, ``client.batches.create/retrieve/list/cancel`` and
``client.files.content`` of the official SDK work unmodified.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, Field
from starlette.responses import FileResponse, Response

from embedpipe.api.deps import body_schema, json_body, json_response
from embedpipe.api.schemas import ErrorBody
from embedpipe.batches.objects import JsonDict
from embedpipe.batches.service import JobService

router = APIRouter(prefix="/v1", tags=["Files and batches"])

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 404, 413)
}

_FILE_BYTES: dict[str, object] = {
    "description": "The file's bytes.",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def get_jobs(request: Request) -> JobService:
    jobs: JobService = request.app.state.jobs
    return jobs


Jobs = Annotated[JobService, Depends(get_jobs)]


def get_owner(request: Request) -> str | None:
    """The caller's API key name: files and batches belong to it (None when auth is off)."""
    client = request.scope.get("state", {}).get("client")
    key = getattr(client, "key", None)
    return getattr(key, "name", None)


Owner = Annotated[str | None, Depends(get_owner)]


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str = Field(examples=["/v1/embeddings"])
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def _page(items: list[JsonDict], limit: int) -> dict[str, object]:
    shown = items[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(items) > limit,
    }


@router.post("/files", responses=_ERRORS)
async def upload_file(
    jobs: Jobs,
    owner: Owner,
    file: Annotated[UploadFile, File(description="JSONL, one request per line.")],
    purpose: Annotated[str, Form()],
) -> Response:
    """Upload a batch input file."""
    return json_response(await jobs.upload(file.filename or "", purpose, file.file, owner))


@router.get("/files")
async def list_files(
    jobs: Jobs,
    owner: Owner,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> Response:
    """Files, newest first."""
    return json_response(_page(await jobs.files(purpose, after, limit + 1, owner), limit))


@router.get("/files/{file_id}", responses=_ERRORS)
async def retrieve_file(file_id: str, jobs: Jobs, owner: Owner) -> Response:
    return json_response(await jobs.file(file_id, owner))


@router.delete("/files/{file_id}", responses=_ERRORS)
async def delete_file(file_id: str, jobs: Jobs, owner: Owner) -> Response:
    return json_response(await jobs.delete_file(file_id, owner))


@router.get(
    "/files/{file_id}/content",
    response_class=FileResponse,
    responses={**_ERRORS, 200: _FILE_BYTES},
)
async def file_content(file_id: str, jobs: Jobs, owner: Owner) -> Response:
    """The file's bytes (batch output and error files are JSONL)."""
    return FileResponse(await jobs.file_path(file_id, owner), media_type="application/octet-stream")


@router.post("/batches", responses=_ERRORS, openapi_extra=body_schema(BatchCreate))
async def create_batch(request: Request, jobs: Jobs, owner: Owner) -> Response:
    """Start a batch over an uploaded file of ``/v1/embeddings`` requests."""
    # Parsed by pydantic-core, not the stdlib: an unpaired surrogate (valid JSON grammar, not
    # Unicode) is a 400 here instead of a batch that no answer or listing can serialise.
    body = await json_body(request, BatchCreate)
    return json_response(
        await jobs.create_batch(
            body.input_file_id, body.endpoint, body.completion_window, body.metadata, owner
        )
    )


@router.get("/batches")
async def list_batches(
    jobs: Jobs,
    owner: Owner,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    """Batches, newest first; page with ``after``."""
    return json_response(_page(await jobs.batches(after, limit + 1, owner), limit))


@router.get("/batches/{batch_id}", responses=_ERRORS)
async def retrieve_batch(batch_id: str, jobs: Jobs, owner: Owner) -> Response:
    return json_response(await jobs.batch(batch_id, owner))


@router.post("/batches/{batch_id}/cancel", responses=_ERRORS)
async def cancel_batch(batch_id: str, jobs: Jobs, owner: Owner) -> Response:
    """Stop scheduling new chunks; the batch ends ``cancelled`` with what was done."""
    return json_response(await jobs.cancel(batch_id, owner))
