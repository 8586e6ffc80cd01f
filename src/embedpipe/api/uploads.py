"""``POST /v1/files``: the multipart body streamed once, straight into the data dir.

FastAPI's ``UploadFile`` would have Starlette spool the file first (in memory up to 1 MB, then
in a temporary file under TMPDIR) before the job service copied it into the data dir: each
upload twice on disk, its texts in a stray temporary file. Here python-multipart's streaming
parser is fed from ``request.stream()`` and the ``file`` part's bytes go, counted against the
size limit as they arrive and written by a worker thread in blocks of about 1 MB, to a
temporary name in the data dir that the job service renames into place once the form is
complete and valid. Whatever goes wrong (a bad form, a size or quota refusal, the client
leaving), that partial file is removed.
"""

from __future__ import annotations

from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from embedpipe.api.deps import ClientGone
from embedpipe.batches.objects import JsonDict
from embedpipe.batches.service import IncomingUpload, JobService
from embedpipe.errors import EmbedpipeError, InvalidInput

_WRITE_BYTES = 1 << 20  # the file's bytes go to disk in blocks of about this size
_MAX_FIELD_BYTES = 1024  # purpose, expires_after[...]: short by nature
_MAX_PARTS = 16
_MAX_HEADER_BYTES = 8 * 1024
_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")

# The form as FastAPI describes an ``UploadFile`` and ``Form`` fields (OpenAPI 3.1).
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "title": "Body_upload_file_v1_files_post",
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "contentMediaType": "application/octet-stream",
                            "title": "File",
                            "description": "JSONL, one request per line.",
                        },
                        "purpose": {"type": "string", "title": "Purpose"},
                        "expires_after[anchor]": {
                            "type": "string",
                            "const": "created_at",
                            "title": "Expires After[Anchor]",
                            "default": "created_at",
                        },
                        "expires_after[seconds]": {
                            "anyOf": [{"type": "integer"}, {"type": "null"}],
                            "title": "Expires After[Seconds]",
                        },
                    },
                    "required": ["file", "purpose"],
                }
            }
        },
    }
}


class _Form:
    """What the parser's callbacks saw, handled between two ``write`` calls (the callbacks
    are synchronous; writing the file is not)."""

    def __init__(self) -> None:
        # (kind, the part's data, or its headers for "headers_finished")
        self.events: list[tuple[str, Any]] = []
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.ended = False

    def callbacks(self) -> Any:  # python-multipart's MultipartCallbacks
        def data(kind: str) -> Any:
            def on_data(chunk: bytes, start: int, end: int) -> None:
                if kind == "part_data":
                    self.events.append((kind, bytes(chunk[start:end])))
                elif kind == "header_field":
                    self.header_field += chunk[start:end]
                else:
                    self.header_value += chunk[start:end]

            return on_data

        def on_header_end() -> None:
            self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
            self.header_field.clear()
            self.header_value.clear()

        def event(kind: str) -> Any:
            def on_event() -> None:
                if kind == "end":
                    self.ended = True
                if kind == "headers_finished":
                    self.events.append((kind, self.headers))
                    self.headers = {}
                else:
                    self.events.append((kind, b""))

            return on_event

        return {
            "on_part_begin": event("part_begin"),
            "on_part_data": data("part_data"),
            "on_part_end": event("part_end"),
            "on_header_field": data("header_field"),
            "on_header_value": data("header_value"),
            "on_header_end": on_header_end,
            "on_headers_finished": event("headers_finished"),
            "on_end": event("end"),
        }


class _Receiver:
    def __init__(self, jobs: JobService, owner: str | None) -> None:
        self.jobs = jobs
        self.owner = owner
        self.form = _Form()
        self.fields: dict[str, str] = {}
        self.upload: IncomingUpload | None = None
        self.filename = ""
        self.parts = 0
        self.current: str | None = None  # the part being read: a field name, or "file"
        self.value = bytearray()
        self.pending = bytearray()  # the file's bytes not yet written

    async def handle_events(self) -> None:
        events, self.form.events = self.form.events, []
        for kind, data in events:
            if kind == "part_begin":
                self.parts += 1
                if self.parts > _MAX_PARTS:
                    raise InvalidInput(f"The form has more than {_MAX_PARTS} parts.")
            elif kind == "headers_finished":
                await self._begin_part(data)
            elif kind == "part_data":
                await self._part_data(data)
            elif kind == "part_end":
                await self._end_part()

    async def _begin_part(self, headers: dict[bytes, bytes]) -> None:
        disposition, options = parse_options_header(headers.get(b"content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise InvalidInput(
                "Each part of the form needs a 'Content-Disposition: form-data; name=...' header."
            )
        self.current = name.decode("utf-8", "replace")
        if self.current != "file":
            self.value.clear()
            return
        if self.upload is not None:
            raise InvalidInput("The form has more than one 'file' part.", param="file")
        if "purpose" in self.fields:  # refused before any byte is stored
            self.jobs.check_upload_fields(self.fields["purpose"], self._seconds())
        self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        self.upload = await self.jobs.start_upload(self.owner)

    async def _part_data(self, data: bytes) -> None:
        if self.current == "file":
            assert self.upload is not None
            self.upload.count(len(data))  # the size limit holds before anything is written
            self.pending += data
            if len(self.pending) >= _WRITE_BYTES:
                await self.flush()
        else:
            self.value += data
            if len(self.value) > _MAX_FIELD_BYTES:
                raise InvalidInput(
                    f"The form field '{self.current}' is longer than {_MAX_FIELD_BYTES} bytes.",
                    param=self.current if self.current in _FIELDS else None,
                )

    async def _end_part(self) -> None:
        if self.current == "file":
            await self.flush()
        elif self.current is not None and self.current not in self.fields:
            try:
                self.fields[self.current] = self.value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"The form field '{self.current}' is not UTF-8.", param=self.current
                ) from None
        self.current = None

    async def flush(self) -> None:
        if self.pending and self.upload is not None:
            block = bytes(self.pending)
            self.pending.clear()
            await self.upload.write(block)

    def _seconds(self) -> int | None:
        anchor = self.fields.get("expires_after[anchor]", "created_at")
        if anchor != "created_at":
            raise InvalidInput(
                "'expires_after[anchor]' must be \"created_at\".", param="expires_after[anchor]"
            )
        seconds = self.fields.get("expires_after[seconds]")
        if seconds is None or seconds == "":
            return None
        try:
            return int(seconds)
        except ValueError:
            raise InvalidInput(
                "'expires_after[seconds]' must be an integer.", param="expires_after[seconds]"
            ) from None

    async def finish(self) -> JsonDict:
        if not self.form.ended:
            raise InvalidInput("The multipart body ends before its closing boundary.")
        if self.upload is None:
            raise InvalidInput(
                "'file' is missing: send the file as a part named 'file'.", param="file"
            )
        purpose = self.fields.get("purpose")
        if purpose is None:
            raise InvalidInput("'purpose' is missing: send purpose=batch.", param="purpose")
        return await self.jobs.finish_upload(
            self.upload, self.filename, purpose, self.owner, self._seconds()
        )


async def receive_upload(request: Request, jobs: JobService, owner: str | None) -> JsonDict:
    """Stream an upload's multipart body into the data dir and store it as a file."""
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        raise InvalidInput(
            "Send the file as multipart/form-data, with a 'file' part and a 'purpose' field."
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidInput("The multipart/form-data Content-Type has no boundary.")
    receiver = _Receiver(jobs, owner)
    try:
        parser = MultipartParser(
            boundary, receiver.form.callbacks(), max_header_size=_MAX_HEADER_BYTES
        )
    except (MultipartParseError, ValueError):
        raise InvalidInput("The multipart/form-data boundary is not valid.") from None
    stream = request.stream()
    try:
        try:
            async for chunk in stream:
                if not chunk:
                    continue
                try:
                    parser.write(chunk)
                except MultipartParseError:
                    raise InvalidInput("The multipart/form-data body is malformed.") from None
                await receiver.handle_events()
        except EmbedpipeError:
            # Read the rest (the body limit bounds it) so the client, still sending, gets
            # this answer rather than a reset connection; nothing more is stored.
            await _drain(stream)
            raise
        except ClientDisconnect:
            raise ClientGone() from None
        return await receiver.finish()
    finally:
        if receiver.upload is not None:
            receiver.upload.discard()  # nothing, once committed


async def _drain(stream: Any) -> None:
    try:
        async for _ in stream:
            pass
    except (ClientDisconnect, HTTPException):  # gone, or past the body limit: answer anyway
        pass
