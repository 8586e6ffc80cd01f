"""OpenAI's File and Batch objects, as plain JSON-able dicts, and the ids that name them.

Ids are unguessable (96 random bits) and checked against a strict pattern before they
touch the disk, so no id can walk out of the data dir.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
FILE_PURPOSES = ("batch", "batch_output")
COMPLETION_WINDOW_SECONDS = {"24h": 24 * 3600}
# OpenAI's bounds on a file's ``expires_after`` (one hour to 30 days).
EXPIRES_AFTER_SECONDS = (3600, 30 * 24 * 3600)

_FILE_ID = re.compile(r"file-[0-9a-f]{24}")
_BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")

JsonDict = dict[str, Any]


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def is_file_id(value: str) -> bool:
    return _FILE_ID.fullmatch(value) is not None


def is_batch_id(value: str) -> bool:
    return _BATCH_ID.fullmatch(value) is not None


def now() -> int:
    return int(time.time())


def expired(item: JsonDict) -> bool:
    """Whether a file's ``expires_at`` has passed (it is then never served again)."""
    expires_at = item.get("expires_at")
    return isinstance(expires_at, int | float) and now() >= expires_at


def file_object(
    file_id: str,
    filename: str,
    purpose: str,
    size: int,
    owner: str | None = None,
    expires_after_seconds: int = 0,
) -> JsonDict:
    """``owner``: the API key name that may see the file (None: anyone, auth is off).
    ``expires_after_seconds``: deleted that long after now (0: kept until deleted)."""
    created = now()
    return {
        "_owner": owner,
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "expires_at": created + expires_after_seconds if expires_after_seconds else None,
        "status_details": None,
    }


# What a batch's lines may ask for: embeddings, or a rerank (Cohere's and Jina's shape).
BATCH_ENDPOINTS = ("/v1/embeddings", "/v1/rerank")


def batch_object(
    batch_id: str,
    input_file_id: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    expire_after_seconds: int = 0,
    owner: str | None = None,
    endpoint: str = "/v1/embeddings",
) -> JsonDict:
    created = now()
    window = expire_after_seconds or COMPLETION_WINDOW_SECONDS[completion_window]
    return {
        "_owner": owner,
        "id": batch_id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created,
        "in_progress_at": None,
        "expires_at": created + window,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }
