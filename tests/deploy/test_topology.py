"""The compose stack's topology without Docker: two API replicas, two Celery workers, a cache
Redis and a broker Redis as plain processes on loopback, each started with the environment
deploy/compose.yaml gives its service (interpolated from .env.example; only hosts, ports and
the data dir are mapped onto this machine), and nginx with the stack's load-balancer config.
Through both replicas: one shared cache, one shared rate limit, and a batch job whose chunks
run on both workers."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from openai import OpenAI

from embedpipe.ratelimit import RateLimiter
from tests.conftest import require_redis_server
from tests.deploy.stack import (
    NGINX_CONF,
    compose,
    image_healthcheck,
    loopback_environment,
    nginx_binary,
    redis_options,
)
from tests.integration.batch_helpers import (
    read_lines,
    request_line,
    submit,
    texts_for,
    vectors_by_custom_id,
    wait_for,
)
from tests.integration.conftest import MODEL
from tests.processes import Startable, start_together, stop_all
from tests.redis_server import RedisServer, command
from tests.server_process import ServerProcess, free_port
from tests.worker_process import WorkerProcess

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.redis]

RPM = 6
CHUNK_SIZE = 20
BATCH_REQUESTS = 200
# What a user would put in .env to see these things on a small machine: a rate limit, small
# chunks, and one torch thread per process (four processes share this machine's cores).
DOT_ENV = {
    "EMBEDPIPE_RATE_LIMIT_RPM": str(RPM),
    "EMBEDPIPE_JOBS__CHUNK_SIZE": str(CHUNK_SIZE),
    "EMBEDPIPE_MODEL_THREADS": "1",
    "GRAFANA_ADMIN_PASSWORD": "not-used-here",
    "EMBEDPIPE_API_KEYS": "sk-not-used-here",
    "STACK_REDIS_PASSWORD": "not-used-here",
}


@dataclass
class Topology:
    stack: dict[str, Any]
    cache: RedisServer
    broker: RedisServer
    apis: list[ServerProcess]
    workers: list[WorkerProcess]


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    require_redis_server()
    root = tmp_path_factory.mktemp("topology")
    stack = compose(DOT_ENV)
    with (
        RedisServer.start_new(root / "redis-cache") as cache,
        RedisServer.start_new(root / "redis-broker") as broker,
    ):
        stand_ins = {"redis-cache": cache, "redis-broker": broker}
        # Each Redis gets its compose service's options (a wrong one fails here), all but
        # the password: tests/stack runs the stack with it, containers and all.
        for service, server in stand_ins.items():
            for name, value in redis_options(stack["services"][service]).items():
                if name != "requirepass":
                    command(server.port, "CONFIG", "SET", name, value)
        addresses = {name: f"127.0.0.1:{server.port}" for name, server in stand_ins.items()}
        shared_data = root / "data"  # the compose volume embedpipe-data
        api_env = loopback_environment(stack, "api", addresses, shared_data)
        # Keyless here (the checks below are about sharing); tests/stack runs them with keys.
        api_env.pop("EMBEDPIPE_API_KEYS")
        worker_env = loopback_environment(stack, "worker", addresses, shared_data)
        apis = [ServerProcess(api_env, root / f"api{n}.log") for n in range(2)]
        workers = [
            WorkerProcess(worker_env, root / f"worker{n}.log", f"worker{n}@topology")
            for n in range(2)
        ]
        processes: list[Startable] = [*apis, *workers]
        start_together(processes)
        try:
            yield Topology(stack, cache, broker, apis, workers)
        finally:
            stop_all(processes)


def _keys(server: RedisServer) -> list[str]:
    with redis.Redis(port=server.port, socket_timeout=5) as client:
        return [key.decode(errors="replace") for key in client.scan_iter(count=1000)]


def _healthcheck(argv: list[str], env: dict[str, str]) -> int:
    """Run a container health check's ``python -c ...`` with this interpreter."""
    assert argv[0] == "python"
    done = subprocess.run(
        [sys.executable, *argv[1:]], env={**os.environ, **env}, capture_output=True, timeout=30
    )
    return done.returncode


def test_the_health_checks_pass_on_live_processes_and_fail_on_dead_ones(
    topology: Topology,
) -> None:
    services = topology.stack["services"]
    api_check = services["api"]["healthcheck"]["test"]
    worker_check = services["worker"]["healthcheck"]["test"]
    assert api_check[0] == worker_check[0] == "CMD"
    nobody = str(free_port())
    for argv in (image_healthcheck(), api_check[1:]):
        assert _healthcheck(argv, {"EMBEDPIPE_PORT": str(topology.apis[0].port)}) == 0
        assert _healthcheck(argv, {"EMBEDPIPE_PORT": nobody}) != 0
    for worker in topology.workers:
        port = {"EMBEDPIPE_JOBS__WORKER_METRICS_PORT": str(worker.metrics_port)}
        assert _healthcheck(worker_check[1:], port) == 0
    assert _healthcheck(worker_check[1:], {"EMBEDPIPE_JOBS__WORKER_METRICS_PORT": nobody}) != 0


def test_a_vector_computed_by_one_replica_is_a_cache_hit_on_the_other(
    topology: Topology,
) -> None:
    a, b = topology.apis
    text = "computed by one replica of the stack, served from the cache by the other"
    hits_before = b.metric("embedpipe_embeddings_total", model=MODEL, source="l2")
    first = httpx.post(f"{a.url}/embed", json={"text": text}, timeout=60).json()
    a.wait_for_cache_writes()
    second = httpx.post(f"{b.url}/embed", json={"text": text}, timeout=60).json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["embedding"] == first["embedding"]
    assert b.metric("embedpipe_embeddings_total", model=MODEL, source="l2") == hits_before + 1
    # In the cache Redis (the one that may evict), not in the broker.
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert any(digest in key for key in _keys(topology.cache))
    assert not any(digest in key for key in _keys(topology.broker))


def test_the_rate_limit_holds_across_the_replicas(topology: Topology) -> None:
    """Alternating between the replicas, one client gets RPM requests in all, not per
    replica. (The client comes from its own loopback address: its own budget.)"""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    replies = []
    with httpx.Client(transport=transport, timeout=60) as client:
        for n in range(RPM + 4):
            api = topology.apis[n % 2]
            body = {"model": MODEL, "input": f"rate limited across replicas {n}"}
            replies.append((api, client.post(f"{api.url}/v1/embeddings", json=body)))
    statuses = [reply.status_code for _, reply in replies]
    assert statuses == [200] * RPM + [429] * 4, statuses
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for _, r in replies[:RPM]]
    assert remaining == list(range(RPM - 1, -1, -1))
    for api in topology.apis:  # each replica both served and refused
        assert {r.status_code for a, r in replies if a is api} == {200, 429}
    refused = replies[-1][1].json()["error"]
    assert (refused["type"], refused["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    # The windows live in the cache Redis, under the client's hashed identity.
    identity = RateLimiter.identifier("ip:127.0.0.2")
    assert any(identity in key for key in _keys(topology.cache))
    assert not any(identity in key for key in _keys(topology.broker))


def _worker_totals(topology: Topology) -> list[tuple[float, float]]:
    """(items succeeded, chunks run) from each worker's own /metrics."""
    return [
        (
            worker.metric("embedpipe_job_items_total", status="succeeded"),
            worker.metric("embedpipe_job_chunk_duration_seconds_count"),
        )
        for worker in topology.workers
    ]


def test_a_batch_job_is_spread_over_both_workers(topology: Topology) -> None:
    a, b = topology.apis
    before = _worker_totals(topology)
    texts = texts_for(BATCH_REQUESTS, "topology")
    with (
        OpenAI(base_url=f"{a.url}/v1", api_key="unused", max_retries=0) as via_a,
        OpenAI(base_url=f"{b.url}/v1", api_key="unused", max_retries=0) as via_b,
    ):
        batch = submit(via_a, [request_line(key, text) for key, text in texts.items()])
        # Followed and read through the other replica: job state in the broker Redis, the
        # files in the shared data dir.
        done = wait_for(via_b, batch.id, ("completed", "failed"), timeout=180)
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (200, 0)
        output = read_lines(via_b, done.output_file_id)
    assert len(output) == BATCH_REQUESTS
    vectors = vectors_by_custom_id(output)
    assert set(vectors) == set(texts)

    done_by = [
        (items - items_before, chunks - chunks_before)
        for (items, chunks), (items_before, chunks_before) in zip(
            _worker_totals(topology), before, strict=True
        )
    ]
    assert all(items > 0 and chunks > 0 for items, chunks in done_by), done_by
    assert sum(items for items, _ in done_by) == BATCH_REQUESTS, done_by
    assert sum(chunks for _, chunks in done_by) == BATCH_REQUESTS // CHUNK_SIZE, done_by

    # The workers wrote their vectors to the shared cache: a replica now serves them as hits.
    keys = list(texts)[::90]
    reply = httpx.post(
        f"{b.url}/embed/batch", json={"texts": [texts[key] for key in keys]}, timeout=60
    ).json()
    assert reply["cached_count"] == len(keys)
    for key, embedding in zip(keys, reply["embeddings"], strict=True):
        assert embedding == pytest.approx(vectors[key], abs=1e-6)
    # The job's state is in the broker Redis (never evicted), not in the cache Redis.
    assert any(batch.id in key for key in _keys(topology.broker))
    assert not any(batch.id in key for key in _keys(topology.cache))


class Nginx:
    """nginx with deploy/nginx/embedpipe.conf, where Docker's DNS name ``api`` becomes an
    upstream group of loopback addresses (nginx looks a proxy_pass variable up among its
    groups before asking the resolver); everything else in the file is used as it is."""

    def __init__(self, root: Path, replicas: list[str]) -> None:
        root.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf, listens = re.subn(
            r"^(\s*)listen 8000;",
            rf"\1listen 127.0.0.1:{self.port};",
            NGINX_CONF.read_text(),
            flags=re.MULTILINE,
        )
        conf, targets = re.subn(r"set \$api_replicas api:8000;", "set $api_replicas api;", conf)
        assert (listens, targets) == (1, 1), "the config changed: adapt this stand-in"
        (root / "embedpipe.conf").write_text(conf)
        servers = "".join(f"    server {address};\n" for address in replicas)
        (root / "nginx.conf").write_text(
            f"pid {root}/nginx.pid;\ndaemon off;\nworker_processes 1;\nevents {{}}\n"
            f"http {{\n  access_log {root}/access.log;\n"
            f"  upstream api {{\n{servers}  }}\n  include {root}/embedpipe.conf;\n}}\n"
        )
        self.log = root / "error.log"
        self.process = subprocess.Popen(
            [nginx_binary(), "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(self.log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.url}/lb-health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def load_balancer(topology: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    root = tmp_path_factory.mktemp("nginx")
    nginx = Nginx(root / "lb", [f"127.0.0.1:{api.port}" for api in topology.apis])
    try:
        yield nginx
    finally:
        nginx.stop()


def test_the_load_balancer_spreads_requests_over_both_replicas(
    topology: Topology, load_balancer: Nginx
) -> None:
    labels = {"route": "/v1/models", "method": "GET", "status": "200"}
    before = [api.metric("embedpipe_http_requests_total", **labels) for api in topology.apis]
    with httpx.Client(base_url=load_balancer.url, timeout=30) as client:
        for _ in range(10):
            reply = client.get("/v1/models")
            assert reply.status_code == 200
            assert reply.json()["data"][0]["id"] == MODEL
    served = [
        api.metric("embedpipe_http_requests_total", **labels) - count
        for api, count in zip(topology.apis, before, strict=True)
    ]
    assert sum(served) == 10 and min(served) > 0, served


def test_the_load_balancer_answers_in_openais_envelope_when_no_replica_does(
    tmp_path: Path,
) -> None:
    nobody = Nginx(tmp_path / "lb", [f"127.0.0.1:{free_port()}"])
    try:
        reply = httpx.post(f"{nobody.url}/v1/embeddings", json={"input": "x"}, timeout=30)
    finally:
        nobody.stop()
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "1"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "service_unavailable"
