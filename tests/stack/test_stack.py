"""The compose stack, running: every check goes through the load balancer (nginx) on its
loopback port as a user's client would, or into one container (``docker exec``) where a
check must pick the replica. The order matters: the last two tests stop containers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from tests.integration.batch_helpers import (
    read_lines,
    request_line,
    submit,
    texts_for,
    vectors_by_custom_id,
    wait_for,
)
from tests.integration.conftest import MODEL, assert_same_vectors, reference_vectors
from tests.stack.conftest import CHUNK_SIZE, KEYS, RPM, Stack

BATCH_REQUESTS = 300
FIXED_BY_COMPOSE = {
    "EMBEDPIPE_REDIS_URL",
    "EMBEDPIPE_BROKER_URL",
    "EMBEDPIPE_DATA_DIR",
    "EMBEDPIPE_HOST",
    "EMBEDPIPE_PORT",
    "EMBEDPIPE_SECURITY__TRUSTED_PROXIES",
    "EMBEDPIPE_JOBS__WORKER_METRICS_PORT",
}


def wait_until(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.5)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric_name, _, label_text = series.partition("{")
        present = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if metric_name == name and present == wanted:
            return float(value)
    return 0.0


def replica_metric(
    stack: Stack, container: str, name: str, port: int = 8000, **labels: str
) -> float:
    ((status, text),) = stack.call(container, "/metrics", port=port)
    assert status == 200, text
    return metric(text, name, **labels)


def openai_client(stack: Stack, key: str = KEYS["main"], retries: int = 0) -> OpenAI:
    """The SDK without its retries by default: an error the stack gives shows."""
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=retries, timeout=120)


def test_every_service_turns_healthy(stack: Stack) -> None:
    services = ("lb", "api", "worker", "redis-cache", "redis-broker", "prometheus")
    counts = {service: len(stack.containers(service)) for service in services}
    assert counts == {
        "lb": 1,
        "api": 2,
        "worker": 2,
        "redis-cache": 1,
        "redis-broker": 1,
        "prometheus": 1,
    }
    for service in services:
        for container in stack.containers(service):
            assert stack.health(container) == "healthy", container
    # Grafana sits behind its profile, which this run leaves out.
    assert stack.containers("grafana") == []
    assert httpx.get(f"{stack.url}/lb-health", timeout=10).status_code == 200


def test_the_containers_run_as_uid_10001_and_the_data_volume_is_writable(stack: Stack) -> None:
    for container in stack.containers("api") + stack.containers("worker"):
        ids = stack.docker.run("exec", container, "id", "-u").stdout.strip()
        assert ids == "10001", container
        probe = f"/data/.written-by-{container}"
        stack.docker.run("exec", container, "python", "-c", f"open({probe!r}, 'w').write('ok')")
        stack.docker.run("exec", container, "rm", probe)


def test_every_embedpipe_setting_of_dot_env_reaches_every_replica_and_worker(
    stack: Stack,
) -> None:
    wanted = {k: v for k, v in stack.settings.items() if k.startswith("EMBEDPIPE_")}
    assert "EMBEDPIPE_CACHE__PER_TENANT" in wanted  # not in .env.example: forwarded all the same
    for container in stack.containers("api") + stack.containers("worker"):
        listed = stack.docker.run("inspect", "--format", "{{json .Config.Env}}", container).stdout
        env = dict(item.split("=", 1) for item in json.loads(listed))
        for name, value in wanted.items():
            if name not in FIXED_BY_COMPOSE:
                assert env.get(name) == value, (container, name)
    # The stack's own values win: the Redis URLs carry the password.
    password = stack.settings["STACK_REDIS_PASSWORD"]
    api = stack.containers("api")[0]
    env = dict(
        item.split("=", 1)
        for item in json.loads(
            stack.docker.run("inspect", "--format", "{{json .Config.Env}}", api).stdout
        )
    )
    assert env["EMBEDPIPE_REDIS_URL"] == f"redis://:{password}@redis-cache:6379/0"
    assert env["EMBEDPIPE_BROKER_URL"] == f"redis://:{password}@redis-broker:6379/0"


def test_the_redis_services_refuse_clients_without_the_password(stack: Stack) -> None:
    for service in ("redis-cache", "redis-broker"):
        (container,) = stack.containers(service)
        # REDISCLI_AUTH (the health check's password) removed: a client without it.
        done = stack.docker.run(
            "exec",
            "--env",
            "REDISCLI_AUTH=",
            container,
            "redis-cli",
            "-h",
            "127.0.0.1",
            "ping",
            check=False,
        )
        assert "NOAUTH" in done.stdout + done.stderr, done


def test_embeddings_through_the_load_balancer_are_the_reference_models_vectors(
    stack: Stack, reference_model: Any
) -> None:
    texts = ["The compose stack serves embeddings.", "Une phrase en français.", "x" * 300]
    with openai_client(stack) as client:
        reply = client.embeddings.create(model=MODEL, input=texts)
    got = [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
    assert_same_vectors(got, reference_vectors(reference_model, texts))
    with openai_client(stack, key="sk-not-a-key") as stranger:
        refused = stranger.embeddings.with_raw_response
        with pytest.raises(AuthenticationError):
            refused.create(model=MODEL, input="who am I")


def test_a_text_embedded_by_one_replica_is_an_l2_hit_on_the_other(stack: Stack) -> None:
    first, second = stack.containers("api")
    body = {"model": MODEL, "input": "embedded by one replica, served from Redis by the other"}
    before = replica_metric(stack, second, "embedpipe_embeddings_total", model=MODEL, source="l2")
    ((status, computed),) = stack.call(first, "/v1/embeddings", body, KEYS["main"])
    assert status == 200, computed
    # The answer does not wait for its L2 write: the other replica asks once it landed.
    wait_until(
        "the first replica's cache write",
        lambda: replica_metric(stack, first, "embedpipe_cache_writes_pending", tier="l2") == 0,
        timeout=30,
    )
    ((status, served),) = stack.call(second, "/v1/embeddings", body, KEYS["main"])
    assert status == 200, served
    assert json.loads(served)["data"] == json.loads(computed)["data"]
    after = replica_metric(stack, second, "embedpipe_embeddings_total", model=MODEL, source="l2")
    assert after == before + 1


def test_one_keys_rate_limit_holds_across_both_replicas(stack: Stack) -> None:
    """Half the key's requests per minute on each replica, then one more through nginx: it is
    refused, though neither replica alone has seen the limit.

    The budget is a fixed window that starts at the key's first request. On a loaded machine
    the RPM requests can take longer than that window, and then the last one rightly passes:
    such a try proves nothing either way, so it is made again with a fresh key."""
    replicas = stack.containers("api")
    body = {"model": MODEL, "input": "rate limited across the replicas"}
    for attempt in range(3):
        key = KEYS[f"rpm{attempt}"]
        started = time.monotonic()
        for container in replicas:
            replies = stack.call(container, "/v1/embeddings", body, key, repeat=RPM // 2)
            assert [status for status, _ in replies] == [200] * (RPM // 2)
        refused = httpx.post(
            f"{stack.url}/v1/embeddings",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        if refused.status_code == 200 and time.monotonic() - started > 55:
            continue  # the window may have rolled over: not a judgement
        break
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    # Another key is not affected.
    other = httpx.post(
        f"{stack.url}/v1/embeddings",
        json=body,
        headers={"Authorization": f"Bearer {KEYS['main']}"},
        timeout=30,
    )
    assert other.status_code == 200


def _worker_items(stack: Stack) -> dict[str, float]:
    return {
        worker: replica_metric(
            stack, worker, "embedpipe_job_items_total", port=9101, status="succeeded"
        )
        for worker in stack.containers("worker")
    }


def test_a_batch_job_through_nginx_runs_on_both_worker_containers(stack: Stack) -> None:
    before = _worker_items(stack)
    texts = texts_for(BATCH_REQUESTS, "stack")
    with openai_client(stack) as client:
        batch = submit(client, [request_line(key, text) for key, text in texts.items()])
        done = wait_for(client, batch.id, ("completed", "failed"), timeout=600)
        assert done.status == "completed", done
        output = read_lines(client, done.output_file_id)
    custom_ids = [line["custom_id"] for line in output]
    assert sorted(custom_ids) == sorted(texts), "every custom_id exactly once"
    assert set(vectors_by_custom_id(output)) == set(texts)
    after = _worker_items(stack)
    done_by = {worker: after[worker] - before[worker] for worker in after}
    assert sum(done_by.values()) == BATCH_REQUESTS, done_by
    assert all(items >= CHUNK_SIZE for items in done_by.values()), done_by


def _query(stack: Stack, promql: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    assert reply.status_code == 200, reply.text
    result: list[dict[str, Any]] = reply.json()["data"]["result"]
    return result


def test_prometheus_scrapes_every_replica_and_worker_and_answers_the_dashboard_queries(
    stack: Stack,
) -> None:
    def all_up() -> bool:
        up = _query(stack, "up")
        by_job = {
            job: [s["value"][1] for s in up if s["metric"]["job"] == job]
            for job in ("embedpipe", "embedpipe-worker")
        }
        return by_job == {"embedpipe": ["1", "1"], "embedpipe-worker": ["1", "1"]}

    wait_until("every target up", all_up, timeout=120)
    # Fresh traffic, then two scrapes (15 s apart) for rate() to see it.
    with openai_client(stack) as client:
        for n in range(20):
            client.embeddings.create(model=MODEL, input=f"for Prometheus {n % 5}")
    p95 = (
        "histogram_quantile(0.95, sum by (le) "
        "(rate(embedpipe_http_request_duration_seconds_bucket[2m])))"
    )
    hit_ratio = (
        'sum(rate(embedpipe_embeddings_total{source=~"l1|l2|shared"}[2m]))'
        " / sum(rate(embedpipe_embeddings_total[2m]))"
    )

    def answered(promql: str) -> Callable[[], bool]:
        def check() -> bool:
            result = _query(stack, promql)
            return len(result) == 1 and result[0]["value"][1] not in ("NaN", "+Inf")

        return check

    wait_until("a p95 latency", answered(p95), timeout=120)
    wait_until("a hit ratio", answered(hit_ratio), timeout=120)
    assert 0 < float(_query(stack, p95)[0]["value"][1]) < 60
    assert 0 < float(_query(stack, hit_ratio)[0]["value"][1]) <= 1


class Load:
    """Clients sending embeddings through nginx, each with its own key, a few per second
    (under the per-key limit), recording every answer and every failure."""

    def __init__(self, stack: Stack, clients: int = 4, per_second: float = 3.0) -> None:
        self.stack = stack
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._pause = 1 / per_second
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)
        ]

    def _run(self, n: int) -> None:
        headers = {"Authorization": f"Bearer {KEYS[f'load{n}']}"}
        with httpx.Client(base_url=self.stack.url, headers=headers, timeout=120) as client:
            count = 0
            while not self.stop.is_set():
                body = {"model": MODEL, "input": f"steady load {n} {count % 50}"}
                count += 1
                try:
                    reply = client.post("/v1/embeddings", json=body)
                    self.statuses.append(reply.status_code)
                    if reply.status_code != 200:
                        self.failures.append(f"{reply.status_code} {reply.text[:200]}")
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                self.stop.wait(self._pause)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=180)


def test_stopping_and_starting_one_api_replica_under_load_costs_clients_nothing(
    stack: Stack, figures: dict[str, str]
) -> None:
    replica = stack.containers("api")[0]
    with Load(stack) as load:
        wait_until("load flowing", lambda: len(load.statuses) >= 20, timeout=60)
        stopped = time.monotonic()
        # compose's stop_grace_period for the api (40 s): the replica drains.
        stack.docker.run("stop", "--time", "40", replica, timeout=120)
        stack.docker.run("start", replica)
        wait_until("the replica healthy again", lambda: stack.health(replica) == "healthy", 240)
        figures["api replica stopped and healthy again in"] = f"{time.monotonic() - stopped:.0f} s"
        # It is back in rotation: nginx sends it requests again.
        wait_until(
            "the restarted replica serving",
            lambda: (
                replica_metric(
                    stack, replica, "embedpipe_embeddings_total", model=MODEL, source="l2"
                )
                + replica_metric(
                    stack, replica, "embedpipe_embeddings_total", model=MODEL, source="l1"
                )
                > 0
            ),
            timeout=60,
        )
        sent = len(load.statuses)
        wait_until("more load", lambda: len(load.statuses) >= sent + 20, timeout=60)
    figures["requests during the replica restart"] = (
        f"{len(load.statuses)} answered, {len(load.failures)} failed"
    )
    assert load.failures == []
    assert set(load.statuses) == {200}


def test_an_api_started_while_the_broker_is_down_turns_ready_by_itself(stack: Stack) -> None:
    (broker,) = stack.containers("redis-broker")
    before = set(stack.containers("api"))
    stack.docker.run("stop", broker)
    try:
        stack.compose("up", "--detach", "--no-deps", "--no-recreate", "--scale", "api=3", "api")
        (started,) = set(stack.containers("api")) - before

        def logged() -> bool:
            done = stack.docker.run("logs", started)
            logs = done.stdout + done.stderr
            return "the broker Redis is unreachable" in logs

        wait_until("the reason logged", logged, timeout=180)
        ((status, body),) = stack.call(started, "/ready")
        assert status == 503 and json.loads(body)["waiting_for"] == ["broker"], body
        assert stack.health(started) != "healthy"
    finally:
        stack.docker.run("start", broker)
    wait_until("ready", lambda: stack.call(started, "/ready")[0][0] == 200, timeout=120)
    wait_until("healthy", lambda: stack.health(started) == "healthy", timeout=120)
    done = stack.docker.run("logs", started)
    logs = done.stdout + done.stderr
    assert logs.count("the broker Redis is unreachable") == 1, logs
    stack.compose("up", "--detach", "--no-deps", "--scale", "api=2", "api")
    # Workers reconnect to the broker by themselves: a batch runs again. A replica whose
    # pooled connection predates the restart may answer one 503 first, as a Redis blip does
    # (never a 500): the SDK's own retries, as users run it, take care of it.
    with openai_client(stack, retries=3) as client:
        texts = texts_for(CHUNK_SIZE, "after the broker came back")
        batch = submit(client, [request_line(key, text) for key, text in texts.items()])
        assert wait_for(client, batch.id, ("completed", "failed"), 300).status == "completed"
