"""Start-up and memory per backend: a real ``embedpipe serve`` with its export already made,
timed from the start of the process to ``/ready``, its resident memory once ready (and its
peak while starting), and the first request after ``/ready`` against the steady state.

    make bench-startup          # or: python -m benchmarks.startup --runs 2

Goals (issue 18): the onnx backend <= 250 MiB resident with the model loaded (torch <= 400),
``/ready`` <= 3 s after start, the first request <= 2x the steady-state latency. Each backend
starts --runs times, alternating, each time in a fresh data dir that shares only the exports
(made first by ``embedpipe models``). Requests are sequential single texts never sent before
(no cache hit). ``/ready`` is polled every 0.2 s; the CPU seconds the process used until then
are what the start costs on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.table import Table

from benchmarks.backends import console
from benchmarks.corpus import load_corpus
from embedpipe.embedders import BUNDLED_MODEL
from embedpipe.settings import Settings
from tests.memory import peak_bytes, rss_bytes
from tests.server_process import ServerProcess

BACKENDS = {
    "torch": {"EMBEDPIPE_BACKEND": "torch"},
    "onnx fp32": {"EMBEDPIPE_BACKEND": "onnx"},
    "onnx int8": {"EMBEDPIPE_BACKEND": "onnx", "EMBEDPIPE_ONNX_QUANTIZE": "int8"},
}
MIB = 2**20


def make_exports(exports: Path) -> None:
    """Every export the backends need, made once before anything is timed."""
    for env in BACKENDS.values():
        subprocess.run(
            [sys.executable, "-m", "embedpipe", "models"],
            env={**os.environ, **env, "EMBEDPIPE_DATA_DIR": str(exports), "HF_HUB_OFFLINE": "1"},
            check=True,
            capture_output=True,
        )


def one_start(env: dict[str, str], exports: Path, texts: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="embedpipe-startup-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "onnx").symlink_to(exports / "onnx")
        server = ServerProcess(
            {
                **env,
                "EMBEDPIPE_DATA_DIR": str(data),
                "EMBEDPIPE_REDIS_URL": "",
                "EMBEDPIPE_MODEL_THREADS": "0",  # every core, as in production
            },
            Path(tmp) / "server.log",
        )
        started = time.perf_counter()
        server.start()
        ready = time.perf_counter() - started
        assert server.process is not None
        pid = server.process.pid
        measured = {"ready_s": ready, "cpu_s": _cpu_seconds(pid), "rss_ready": rss_bytes(pid) / MIB}
        measured["peak_start"] = peak_bytes(pid) / MIB
        latencies = []
        try:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                # The connection first (as a load balancer's probe opens it): the first
                # request's time is then the server's, not the client's TCP handshake.
                http.get("/ready").raise_for_status()
                for text in texts:
                    body = {"model": BUNDLED_MODEL, "input": text}
                    sent = time.perf_counter()
                    http.post("/v1/embeddings", json=body).raise_for_status()
                    latencies.append(time.perf_counter() - sent)
            measured["rss_after"] = rss_bytes(pid) / MIB
        finally:
            server.stop()
    measured["first_ms"] = latencies[0] * 1000
    measured["steady_ms"] = statistics.median(latencies[1:]) * 1000
    return measured


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used: what start-up costs on an idle machine,
    whatever else shares the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="starts per backend, alternating")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per start")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--data-dir", type=Path, default=None, help="where exports live")
    args = parser.parse_args()
    exports: Path = args.data_dir or Settings().data_dir
    chosen = [name.strip() for name in args.backends.split(",")]
    make_exports(exports)
    load = os.getloadavg()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    # Short unique texts (a typical query); each start gets its own, so none is cached.
    pool = [text for text in load_corpus(2_000) if len(text) < 300]
    for run in range(args.runs):
        for number, name in enumerate(chosen):
            start = (run * len(chosen) + number) * args.requests
            texts = pool[start : start + args.requests]
            results[name].append(one_start(BACKENDS[name], exports, texts))
    table = Table(
        "backend",
        "/ready after start (s)",
        "CPU to ready (s)",
        "RSS ready (MiB)",
        "peak starting (MiB)",
        "RSS after (MiB)",
        "first request (ms)",
        "steady p50 (ms)",
        "first / steady",
    )
    for name, runs in results.items():

        def each(key: str, fmt: str, runs: list[dict[str, float]] = runs) -> str:
            return " / ".join(format(run[key], fmt) for run in runs)

        table.add_row(
            name,
            each("ready_s", ".2f"),
            each("cpu_s", ".2f"),
            each("rss_ready", ".0f"),
            each("peak_start", ".0f"),
            each("rss_after", ".0f"),
            each("first_ms", ".1f"),
            each("steady_ms", ".1f"),
            " / ".join(f"{run['first_ms'] / run['steady_ms']:.2f}" for run in runs),
        )
    console.print(
        f"{args.runs} starts per backend, {args.requests} sequential single-text requests each; "
        f"load average {load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    console.print(table)


if __name__ == "__main__":
    main()
