"""uvicorn's HTTP parsers under normal traffic and under request-head attacks.

Serves a minimal ASGI app (so only the server's work is measured) with: ``httptools``
(uvicorn's default when installed), plain ``h11``, and embedpipe's guarded protocols over each
(a head deadline, a 64 KB head, connection caps; ``api/connections.py``). For each:

- keep-alive GETs from 4 clients: requests/s and server CPU per request;
- one connection sending an unfinished header value of ``--attack-mb`` MB in 16 KB chunks:
  server CPU seconds, RSS growth, and how much the server read before closing;
- 50 slowloris connections: how many are still open after 5 s.

Run: ``python -m benchmarks.http_parsers`` (about a minute). Numbers move on a shared
machine; the ratios between parsers hold.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_SERVER = """
import functools, sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
kind, port = sys.argv[1], int(sys.argv[2])
options = {"http": kind}
if kind.startswith("guarded"):
    from embedpipe.api import connections
    limits = connections.ConnectionLimits(head_timeout=2.0, max_connections=1000, max_per_client=0)
    protocol = (connections.GuardedH11Protocol if kind == "guarded-h11"
                else connections.GuardedHttpToolsProtocol)
    options = {"http": functools.partial(protocol, limits=limits),
               "h11_max_incomplete_event_size": 64 * 1024}
uvicorn.run(app, host="127.0.0.1", port=port, log_level="critical", **options)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _start(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-c", _SERVER, kind, str(port)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{kind} server did not start")


def _requests(port: int, clients: int = 4, each: int = 1000) -> float:
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"

    def run() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        for _ in range(each):
            sock.sendall(request)
            received = b""
            while not received.endswith(b"ok"):
                received += sock.recv(4096)
        sock.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * each / (time.perf_counter() - started)


def _big_header(port: int, megabytes: int) -> int:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
    sent = 0
    chunk = b"a" * 16384
    try:
        while sent < megabytes << 20:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    sock.close()
    return sent


def _slowloris(port: int, count: int = 50, seconds: float = 5.0) -> int:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        socks.append(sock)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"X-a: b\r\n")
        time.sleep(0.5)
    still_open = 0
    for sock in socks:
        try:
            sock.sendall(b"X-a: b\r\n")
            sock.settimeout(0.2)
            sock.recv(1)  # an answer (408) or the end: closed by the server
        except TimeoutError:
            still_open += 1
        except OSError:
            pass
        sock.close()
    return still_open


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack-mb", type=int, default=16)
    args = parser.parse_args()
    print(
        f"{'parser':17} {'req/s':>8} {'cpu ms/req':>10} | {args.attack_mb} MB header: "
        f"{'cpu s':>6} {'rss +MB':>8} {'read MB':>8} | slowloris open after 5 s"
    )
    for kind in ("httptools", "h11", "guarded-httptools", "guarded-h11"):
        process, port = _start(kind)
        try:
            _requests(port, each=100)  # warm
            cpu = _cpu(process.pid)
            rate = _requests(port)
            per_request = (_cpu(process.pid) - cpu) / 4000 * 1000
            cpu, rss = _cpu(process.pid), _rss_mb(process.pid)
            sent = _big_header(port, args.attack_mb)
            time.sleep(0.5)
            attack_cpu, attack_rss = _cpu(process.pid) - cpu, _rss_mb(process.pid) - rss
            still_open = _slowloris(port)
            print(
                f"{kind:17} {rate:8.0f} {per_request:10.3f} | {'':14}{attack_cpu:6.2f} "
                f"{attack_rss:8.1f} {sent / (1 << 20):8.1f} | {still_open}/50"
            )
        finally:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
