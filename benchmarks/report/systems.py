"""The servers under test, started together and stopped together: embedpipe (a real
``embedpipe serve``, the embedded default in a fresh data dir), the naive design
(benchmarks/naive_server.py on a private Redis) and Infinity when its venv is there."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import ModelWorkProbe
from benchmarks.naive_server import NaiveServerProcess
from benchmarks.report import infinity
from benchmarks.report.schema import Peer
from benchmarks.throughput import embedpipe_model_work
from tests.redis_server import RedisServer
from tests.server_process import ServerProcess

EMBEDPIPE, NAIVE, INFINITY = "embedpipe", "naive", "Infinity 0.0.78"


@dataclass(frozen=True)
class Target:
    """A server the sweeps drive; ``model_work`` reads its cache counters (None: no cache)."""

    name: str
    url: str
    pid: int
    model_work: ModelWorkProbe | None


@contextlib.contextmanager
def started(
    root: Path, model_dir: Path, workdir: Path, peers: list[Peer]
) -> Iterator[list[Target]]:
    """Every server that starts; a peer that cannot start is noted in ``peers`` and left out."""
    with contextlib.ExitStack() as stack:
        server = ServerProcess(
            {
                "EMBEDPIPE_DATA_DIR": str(workdir / "data"),
                "EMBEDPIPE_REDIS_URL": "",
                "EMBEDPIPE_MODEL_THREADS": "0",  # every usable core, as in production
            },
            workdir / "embedpipe.log",
        )
        stack.callback(server.stop)
        server.start()
        assert server.process is not None
        targets = [
            Target(
                EMBEDPIPE,
                server.url,
                server.process.pid,
                lambda: embedpipe_model_work(server.url),
            )
        ]
        redis = stack.enter_context(RedisServer.start_new(workdir / "redis"))
        naive = stack.enter_context(NaiveServerProcess(redis.url, workdir / "naive.log"))
        targets.append(Target(NAIVE, naive.url, naive.pid, naive.cache_counts))
        version = infinity.installed_version(root)
        if version is None:
            peers.append(Peer(name=INFINITY, measured=False, note=infinity.why_missing(root)))
        else:
            try:
                peer = stack.enter_context(
                    infinity.infinity_server(root, model_dir, workdir / "infinity.log")
                )
            except (RuntimeError, TimeoutError) as error:
                note = f"installed ({version}) but did not start: {str(error)[-400:]}"
                peers.append(Peer(name=INFINITY, measured=False, note=note))
            else:
                targets.append(Target(INFINITY, peer.url, peer.pid, None))
                peers.append(
                    Peer(
                        name=INFINITY,
                        measured=True,
                        note=f"infinity-emb {version}, `--engine torch --device cpu`, "
                        "its own venv (torch 2.13.0, sentence-transformers<4, numpy<2); no cache",
                    )
                )
        yield targets
