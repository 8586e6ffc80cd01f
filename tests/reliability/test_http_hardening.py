"""Attacks on a real ``embedpipe serve`` (the bundled model, no key: the laptop default), each
with a legitimate client watching from another loopback address (127.0.0.2): it must keep
getting answers promptly, and the server's memory must stay flat.

- Request heads: one unfinished huge header, megabytes of small headers, slowloris
  connections that never finish their head, idle sockets past the per-client cap.
- ``X-Forwarded-For`` from a loopback peer with no trusted proxy: ignored.
- Long texts: a request's time and memory stay flat as its characters grow past the window.
- Expensive bodies (millions of token ids, 16 MB of texts): ``/health`` stays prompt.

Sizes are small enough to run in well under a minute on a loaded 2-core machine, and large
enough that today's ``main`` fails each test (see SECURITY.md for its numbers).
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.conftest import MODEL
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.reliability, pytest.mark.model, pytest.mark.server]

HEAD_TIMEOUT = 2.0
PER_CLIENT = 24
RPM = 3  # per client address: each test below calls from its own loopback address
LEGIT = "127.0.0.2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("hardening")
    process = ServerProcess(
        {
            "EMBEDPIPE_DATA_DIR": str(home / "data"),
            "EMBEDPIPE_REDIS_URL": "",
            "EMBEDPIPE_API_KEYS": "",
            "EMBEDPIPE_RATE_LIMIT_RPM": str(RPM),
            "EMBEDPIPE_HTTP__HEAD_TIMEOUT_SECONDS": str(HEAD_TIMEOUT),
            "EMBEDPIPE_HTTP__MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
            "EMBEDPIPE_LOG_LEVEL": "warning",
        },
        home / "server.log",
    )
    process.start()
    yield process
    process.stop()


def _pid(server: ServerProcess) -> int:
    assert server.process is not None
    return server.process.pid


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watch(threading.Thread):
    """Until stopped: a legitimate client's ``GET path`` every ``interval`` (latency, status)
    and the server's resident memory (peak)."""

    def __init__(self, server: ServerProcess, path: str = "/health", interval: float = 0.05):
        super().__init__(daemon=True)
        self.url = server.url + path
        self.pid = _pid(server)
        self.interval = interval
        self.answers: list[tuple[float, int]] = []
        self.rss_before = _rss(self.pid)
        self.rss_peak = self.rss_before
        self._stop_event = threading.Event()

    def run(self) -> None:
        transport = httpx.HTTPTransport(local_address=LEGIT)
        with httpx.Client(transport=transport, timeout=10) as client:
            while not self._stop_event.is_set():
                started = time.perf_counter()
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((time.perf_counter() - started, status))
                self.rss_peak = max(self.rss_peak, _rss(self.pid))
                self._stop_event.wait(self.interval)

    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop_event.set()
        self.join(timeout=15)

    @property
    def slowest(self) -> float:
        return max(seconds for seconds, _ in self.answers)

    def percentile(self, q: float) -> float:
        return float(np.quantile([seconds for seconds, _ in self.answers], q))


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, once it has closed; None while it is open."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return None
    try:
        data = sock.recv(65536)
    except OSError:
        return b""
    if not data:
        return b""
    try:
        sock.settimeout(1)
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def _flood_head(port: int, first: bytes, chunk: bytes, total: int) -> tuple[int, bytes]:
    """Send an unfinished request head of up to ``total`` bytes; (bytes the server took
    before closing, what it answered)."""
    sock = _connect(port)
    sent = 0
    try:
        sock.sendall(first)
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
            if _closed(sock) is not None:
                break
            time.sleep(0.001)
    except OSError:
        pass  # closed by the server: what we wanted
    deadline = time.monotonic() + HEAD_TIMEOUT + 5
    answer = None
    while answer is None and time.monotonic() < deadline:
        answer = _closed(sock)
        time.sleep(0.05)
    sock.close()
    return sent, b"<still open>" if answer is None else answer


def _slowloris(port: int, count: int) -> list[float]:
    """``count`` connections that send a header line every 0.25 s and never end their head:
    the seconds until the server closed each (inf: still open at the deadline)."""
    socks = []
    for _ in range(count):
        sock = _connect(port)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        socks.append(sock)
    started = time.monotonic()
    closed_after = [float("inf")] * count
    while time.monotonic() - started < HEAD_TIMEOUT + 6:
        open_ = [i for i in range(count) if closed_after[i] == float("inf")]
        if not open_:
            break
        for i in open_:
            if _closed(socks[i]) is not None:
                closed_after[i] = time.monotonic() - started
                continue
            try:
                socks[i].sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed_after[i] = time.monotonic() - started
        time.sleep(0.25)
    for sock in socks:
        sock.close()
    return closed_after


def _idle_sockets(port: int, count: int, source: str) -> list[bytes | None]:
    """``count`` silent connections from ``source``; what each got within a second."""
    socks = [_connect(port, source) for _ in range(count)]
    time.sleep(1.0)
    answers = [_closed(sock) for sock in socks]
    for sock in socks:
        sock.close()
    return answers


def _in_threads(*jobs: Callable[[], Any]) -> list[Any]:
    results: list[Any] = [None] * len(jobs)

    def run(index: int) -> None:
        results[index] = jobs[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_request_head_attacks_leave_a_legitimate_client_answered(server: ServerProcess) -> None:
    port = server.port
    with Watch(server) as watch:
        big, many, slow, idle = _in_threads(
            # One unfinished header value, 2 MB at most.
            lambda: _flood_head(
                port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ", b"a" * 16384, 2 << 20
            ),
            # Small headers, 2 MB at most.
            lambda: _flood_head(
                port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n", b"X-h: v\r\n" * 2048, 2 << 20
            ),
            lambda: _slowloris(port, PER_CLIENT - 4),
            lambda: _idle_sockets(port, PER_CLIENT + 16, "127.0.0.3"),
        )
    # The head is cut at 64 KB: the server answers 431 and closes, it does not read on.
    for sent, answer in (big, many):
        assert sent < 1 << 20, (sent, answer[:100])
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:100]
    # Slowloris: every connection closed at the head deadline (408), none held.
    assert max(slow) < HEAD_TIMEOUT + 3, slow
    # Idle sockets past the per-client cap: refused at once with 503; the rest wait for the
    # deadline like any other.
    refused = [a for a in idle if a is not None and a.startswith(b"HTTP/1.1 503")]
    assert len(refused) >= 15, idle
    # The legitimate client was answered all along, promptly; memory stayed flat.
    assert watch.answers and {status for _, status in watch.answers} == {200}, watch.answers
    assert watch.slowest < 1.0, watch.answers
    assert watch.rss_peak - watch.rss_before < 100 << 20, (watch.rss_before, watch.rss_peak)


def test_too_many_headers_are_refused(server: ServerProcess) -> None:
    headers = {f"x-extra-{i}": "1" for i in range(120)}
    reply = httpx.get(f"{server.url}/health", headers=headers, timeout=10)
    assert reply.status_code == 431, reply.text
    assert reply.json()["error"]["code"] == "too_many_headers"


def test_forwarded_for_from_loopback_picks_no_rate_limit_bucket(server: ServerProcess) -> None:
    # No trusted proxies: every request is the peer's (127.0.0.1), whatever it claims.
    statuses = []
    for hop in range(RPM + 3):
        reply = httpx.post(
            f"{server.url}/embed",
            json={"text": "who am I", "model": MODEL},
            headers={"X-Forwarded-For": f"198.51.100.{hop}"},
            timeout=60,
        )
        statuses.append(reply.status_code)
    assert statuses == [200] * RPM + [429] * 3, statuses
    assert "127.0.0.1" in reply.json()["error"]["message"]


def _embed_from(server: ServerProcess, source: str, text: str) -> tuple[dict[str, Any], float, int]:
    """(answer, server CPU seconds, server peak RSS growth) of one request of ``text``."""
    pid = _pid(server)
    rss_before = _rss(pid)
    peak = rss_before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss(pid))
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_before = _cpu_seconds(pid)
    body = json.dumps({"model": MODEL, "input": text}).encode()
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=120) as http:
        reply = http.post(
            f"{server.url}/v1/embeddings",
            content=body,
            headers={"content-type": "application/json"},
        )
    cpu = _cpu_seconds(pid) - cpu_before
    done.set()
    sampler.join()
    assert reply.status_code == 200, reply.text
    return reply.json(), cpu, peak - rss_before


def test_a_requests_cost_stays_flat_past_the_window(server: ServerProcess) -> None:
    sentence = "Embeddings turn text into vectors; near meanings land near each other. "
    short = sentence * 150  # 10 KB, already past the 256-token window
    answers = {}
    for n, (name, text) in enumerate(
        [
            ("warm", sentence * 10),
            ("short", short),
            ("long", sentence * 14_000),  # 1 MB: the most one input may hold
        ]
    ):
        answers[name] = _embed_from(server, f"127.0.0.{10 + n}", text)
    (short_answer, short_cpu, _), (long_answer, long_cpu, long_rss) = (
        answers["short"],
        answers["long"],
    )
    # The same tokens were kept: the same count, the same vector.
    assert (
        short_answer["usage"]
        == long_answer["usage"]
        == {
            "prompt_tokens": 256,
            "total_tokens": 256,
        }
    )
    cosine = float(
        np.dot(short_answer["data"][0]["embedding"], long_answer["data"][0]["embedding"])
    )
    assert cosine > 0.9999
    # Generous bounds: today the 1 MB text costs ~3 s of CPU and ~150 MB (tokenized whole,
    # twice: once to count, once in the model).
    assert long_cpu < 3 * short_cpu + 0.5 and long_rss < 64 << 20, (short_cpu, long_cpu, long_rss)


def test_health_stays_prompt_while_expensive_bodies_arrive(server: ServerProcess) -> None:
    ids = list(range(1000, 3000))
    token_ids = json.dumps({"model": MODEL, "input": [ids] * 1200}).encode()  # 2.4M ids, 12 MB
    texts = json.dumps({"model": MODEL, "input": ["word " * 1580] * 2048}).encode()  # 16 MB

    def post(source: str, body: bytes) -> int:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=120) as http:
            return http.post(
                f"{server.url}/v1/embeddings",
                content=body,
                headers={"content-type": "application/json"},
            ).status_code

    with Watch(server, interval=0.02) as watch:
        time.sleep(0.2)
        statuses = _in_threads(
            lambda: post("127.0.0.20", token_ids),
            lambda: post("127.0.0.21", token_ids),
            lambda: post("127.0.0.22", token_ids),
            lambda: post("127.0.0.23", texts),
            lambda: post("127.0.0.24", texts),
        )
        time.sleep(0.2)
    # Generous for a loaded machine: most answers under 100 ms (measured: all under 60 ms;
    # today 1.2 s here, 4 s in the probe), none over half a second.
    slowest = sorted(s for s, _ in watch.answers)[-10:]
    assert watch.percentile(0.9) < 0.1 and watch.slowest < 0.5, slowest
    assert {status for _, status in watch.answers} == {200}
    # Refused by their sizes, before any token id was decoded or any text tokenized.
    assert statuses == [400] * 5, statuses
