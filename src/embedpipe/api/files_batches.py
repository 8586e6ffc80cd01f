"""OpenAI's Files and Batch API for ``endpoint: "/v1/embeddings"``.

``client.files.create(purpose="batch")``, ``client.batches.create/retrieve/list/cancel`` and
``client.files.content`` of the official SDK work unmodified.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated, BinaryIO, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import FileResponse, Response, StreamingResponse

from embedpipe.api.deps import body_schema, json_body, json_response
from embedpipe.api.schemas import ErrorBody
from embedpipe.api.uploads import UPLOAD_OPENAPI, receive_upload
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


class ExpiresAfter(BaseModel):
    anchor: Literal["created_at"] = "created_at"
    seconds: int


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str = Field(examples=["/v1/embeddings"])
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None


def _page(items: list[JsonDict], limit: int) -> dict[str, object]:
    shown = items[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(items) > limit,
    }


@router.post("/files", responses=_ERRORS, openapi_extra=UPLOAD_OPENAPI)
async def upload_file(request: Request, jobs: Jobs, owner: Owner) -> Response:
    """Upload a batch input file (multipart/form-data: ``file``, ``purpose``); it expires
    after ``expires_after`` or the server's retention (30 days unless configured).

    The body is streamed once, straight into the data dir (see ``embedpipe.api.uploads``)."""
    return json_response(await receive_upload(request, jobs, owner))


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
    # Opened before the headers go: a delete racing the download cannot cut it short.
    source = await jobs.open_file(file_id, owner)
    size = os.fstat(source.fileno()).st_size
    return StreamingResponse(
        _read_through(source),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size)},
    )


async def _read_through(source: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while block := await anyio.to_thread.run_sync(source.read, 1 << 20):
            yield block
    finally:
        source.close()


@router.post("/batches", responses=_ERRORS, openapi_extra=body_schema(BatchCreate))
async def create_batch(request: Request, jobs: Jobs, owner: Owner) -> Response:
    """Start a batch over an uploaded file of ``/v1/embeddings`` requests."""
    # Parsed by pydantic-core, not the stdlib: an unpaired surrogate (valid JSON grammar, not
    # Unicode) is a 400 here instead of a batch that no answer or listing can serialise.
    body = await json_body(request, BatchCreate)
    return json_response(
        await jobs.create_batch(
            body.input_file_id,
            body.endpoint,
            body.completion_window,
            body.metadata,
            owner,
            body.output_expires_after.seconds if body.output_expires_after else None,
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
