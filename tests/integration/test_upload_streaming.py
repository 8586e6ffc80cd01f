"""``POST /v1/files`` streams the multipart body once, straight into the data dir.

No copy of an upload (nor of its texts) lands in the server's TMPDIR, as Starlette's spooled
form parsing would put one there past 1 MB; over-size and malformed uploads leave nothing.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, cast

import httpx
import pytest
from openai import OpenAI

from tests.server_process import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.server]

MAX_FILE_BYTES = 4 * 1024 * 1024
LINE = b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}\n'


class Server:
    def __init__(self, process: ServerProcess, tmpdir: Path, files_dir: Path) -> None:
        self.process = process
        self.url = process.url
        self.tmpdir = tmpdir
        self.files_dir = files_dir
        # What start-up put there (torch's compile cache directory): not uploads.
        self.at_start = {str(path) for path in tmpdir.rglob("*")}

    def tmpdir_uses(self) -> list[str]:
        """Entries of the server's TMPDIR, and open files in it (Linux's ``TemporaryFile``
        has no name: O_TMPFILE), so an unnamed spool file counts too."""
        uses = [str(path) for path in self.tmpdir.rglob("*") if str(path) not in self.at_start]
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            try:
                links = [os.readlink(fd) for fd in fd_dir.iterdir()]
            except OSError:  # another user's process, or one that just ended
                continue
            uses += [link for link in links if link.startswith(str(self.tmpdir))]
        return uses

    def stored(self) -> list[str]:
        return sorted(entry.name for entry in self.files_dir.iterdir())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("upload-streaming")
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    process = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(root / "data"),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_JOBS__MAX_FILE_BYTES": str(MAX_FILE_BYTES),
            "TMPDIR": str(tmpdir),
        },
        root / "server.log",
    )
    process.start()
    try:
        yield Server(process, tmpdir, root / "data" / "files")
    finally:
        process.stop()


class WatchedUpload(io.RawIOBase):
    """``size`` bytes of JSONL that, before its last chunks, waits until the server holds more
    than 1 MB of it somewhere (Starlette's spool threshold) and then checks the TMPDIR."""

    def __init__(self, server: Server, size: int) -> None:
        self.server = server
        body = LINE * (size // len(LINE) + 1)
        self.data = body[:size]
        self.position = 0
        self.checked_during = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.data)}
        self.position = base[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = len(self.data) - self.position
        if not self.checked_during and self.position >= len(self.data) - 256 * 1024:
            self._wait_for_the_server_to_hold_over_a_megabyte()
            assert self.server.tmpdir_uses() == [], "the upload was spooled to TMPDIR"
            self.checked_during = True
        block = self.data[self.position : self.position + size]
        self.position += len(block)
        return block

    def _wait_for_the_server_to_hold_over_a_megabyte(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.server.tmpdir_uses():
                return  # spooled where it should not be: the caller's assertion says so
            partial = [
                entry.stat().st_size
                for entry in self.server.files_dir.iterdir()
                if entry.name.startswith(".")
            ]
            if partial and max(partial) > 1024 * 1024 + 64 * 1024:
                return
            time.sleep(0.01)
        raise AssertionError("the server never held more than 1 MB of the upload")


def test_a_large_upload_never_touches_the_tmpdir(server: Server) -> None:
    size = 3 * 1024 * 1024
    source = WatchedUpload(server, size)
    with OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as sdk:
        uploaded = sdk.files.create(file=("big.jsonl", cast("IO[bytes]", source)), purpose="batch")
        assert source.checked_during
        assert uploaded.bytes == size
        assert sdk.files.content(uploaded.id).content == source.data
        assert server.tmpdir_uses() == []
        assert server.stored() == [uploaded.id]
        sdk.files.delete(uploaded.id)
    assert server.stored() == []


def _multipart(content: bytes, purpose: str = "batch") -> tuple[bytes, str]:
    boundary = "embedpipe-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"'
            "\r\nContent-Type: application/jsonl\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_over_size_upload_is_413_and_leaves_nothing(server: Server, chunked: bool) -> None:
    # Just past the file limit, under the body limit (the file limit plus framing room): it is
    # the upload's own count that refuses it, while streaming.
    body, content_type = _multipart(LINE * (MAX_FILE_BYTES // len(LINE) + 1))

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    reply = httpx.post(
        f"{server.url}/v1/files",
        content=pieces() if chunked else body,
        headers={"content-type": content_type},
        timeout=60,
    )
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert str(MAX_FILE_BYTES) in error["message"]
    assert server.stored() == []
    assert server.tmpdir_uses() == []


_GOOD, _MULTIPART = _multipart(b"{}\n")
_BAD_UPLOADS = {
    "bad-part-headers": (b"--b\r\nnot a header\r\n\r\nx\r\n--b--\r\n", "boundary=b", None),
    "unterminated": (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n{}\n',
        "boundary=b",
        None,
    ),
    "garbage": (b"\x00\xff" * 5000, "boundary=b", None),
    "no-boundary": (b"{}", "", None),
    "no-file": (_GOOD.replace(b'name="file"', b'name="other"'), None, "file"),
    "no-purpose": (_GOOD.replace(b'name="purpose"', b'name="other"'), None, "purpose"),
    "bad-purpose": (_multipart(b"{}\n", purpose="fine-tune")[0], None, "purpose"),
}


@pytest.mark.parametrize("case", list(_BAD_UPLOADS))
def test_malformed_uploads_are_400_and_leave_nothing(server: Server, case: str) -> None:
    body, options, param = _BAD_UPLOADS[case]
    content_type = _MULTIPART if options is None else f"multipart/form-data; {options}".strip()
    headers = {"content-type": content_type.rstrip("; ")}
    reply = httpx.post(f"{server.url}/v1/files", content=body, headers=headers, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert server.stored() == []
    assert server.tmpdir_uses() == []


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_a_body_that_is_not_multipart_is_refused(server: Server, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    reply = httpx.post(f"{server.url}/v1/files", content=b"{}", headers=headers, timeout=30)
    assert reply.status_code in (400, 415), reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert server.stored() == []


def test_expires_after_form_fields_still_apply(server: Server) -> None:
    body, content_type = _multipart(b"{}\n")
    boundary = content_type.split("=", 1)[1]
    fields = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="expires_after[anchor]"\r\n\r\n'
        f"created_at\r\n--{boundary}\r\nContent-Disposition: form-data; "
        f'name="expires_after[seconds]"\r\n\r\n7200\r\n'
    ).encode()
    reply = httpx.post(
        f"{server.url}/v1/files",
        content=fields + body,
        headers={"content-type": content_type},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    uploaded = reply.json()
    assert uploaded["expires_at"] - uploaded["created_at"] == 7200
    assert uploaded["bytes"] == 3 and uploaded["filename"] == "f.jsonl"
    assert httpx.delete(f"{server.url}/v1/files/{uploaded['id']}").status_code == 200
    assert server.stored() == []


def _wait_until(condition: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_client_that_leaves_mid_upload_leaves_nothing(server: Server) -> None:
    body, content_type = _multipart(LINE * (3 * 1024 * 1024 // len(LINE)))
    sent = body[: 2 * 1024 * 1024]
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + sent
        )
        assert _wait_until(lambda: any(n.startswith(".upload-") for n in server.stored()))
    # Closed half-way: the partial file goes.
    assert _wait_until(lambda: server.stored() == []), server.stored()
    assert server.tmpdir_uses() == []
    assert httpx.get(f"{server.url}/ready").status_code == 200
