"""Shared fixtures. Redis tests run against ``$EMBEDPIPE_TEST_REDIS_URL`` when it is set,
else against a private redis-server started for the session. Without a redis-server they skip
on a developer's machine and fail in CI (``CI=true``), where a skip would hide a missing install."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rabbitmq_server import NO_RABBITMQ_SERVER, RabbitMqServer, find_rabbitmq_server
from tests.redis_server import NO_REDIS_SERVER, RedisServer, find_redis_server

TEST_REDIS_URL_ENV = "EMBEDPIPE_TEST_REDIS_URL"
TEST_AMQP_URL_ENV = "EMBEDPIPE_TEST_AMQP_URL"
# Builds images and runs the compose stack in Docker (~15 min): collected only when named,
# as `make test-stack` does (`pytest tests/stack`), never by a plain `pytest`.
STACK_TESTS = Path(__file__).resolve().parent / "stack"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path != STACK_TESTS:
        return None
    named = [(config.invocation_params.dir / arg.split("::")[0]).resolve() for arg in config.args]
    return not any(path == STACK_TESTS or STACK_TESTS in path.parents for path in named)


def require_redis_server() -> None:
    if find_redis_server() is not None:
        return
    if _in_ci():
        pytest.fail(NO_REDIS_SERVER)
    pytest.skip(NO_REDIS_SERVER)


def require_rabbitmq_server() -> None:
    if find_rabbitmq_server() is not None:
        return
    if _in_ci():
        pytest.fail(NO_RABBITMQ_SERVER)
    pytest.skip(NO_RABBITMQ_SERVER)


@pytest.fixture(scope="session")
def amqp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A RabbitMQ for the session: ``$EMBEDPIPE_TEST_AMQP_URL``, else a private node (its own
    ports, data and cookie). Tests use queue names of their own."""
    url = os.environ.get(TEST_AMQP_URL_ENV)
    if url:
        yield url
        return
    require_rabbitmq_server()
    with RabbitMqServer.start_new(tmp_path_factory.mktemp("rabbitmq")) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the whole session. Tests must use their own key namespace (see
    ``namespace``) and never flush it: it may be someone else's."""
    url = os.environ.get(TEST_REDIS_URL_ENV)
    if url:
        yield url
        return
    require_redis_server()
    with RedisServer.start_new(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may pause, kill and restart."""
    require_redis_server()
    with RedisServer.start_new(tmp_path_factory.mktemp("private-redis")) as server:
        yield server


@pytest.fixture
def namespace() -> str:
    """A key namespace no other test (or run) uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved ``CrossEncoder`` on the bundled MiniLM weights with a seeded head."""
    from tests.cross_encoder import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder") / "ranker")
