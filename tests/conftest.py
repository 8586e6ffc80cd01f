"""Shared fixtures. Redis tests run against ``$EMBEDPIPE_TEST_REDIS_URL`` when it is set,
else against a private redis-server started for the session; they skip when neither exists."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.redis_server import NO_REDIS_SERVER, RedisServer, find_redis_server

TEST_REDIS_URL_ENV = "EMBEDPIPE_TEST_REDIS_URL"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the whole session. Tests must use their own key namespace (see
    ``namespace``) and never flush it: it may be someone else's."""
    url = os.environ.get(TEST_REDIS_URL_ENV)
    if url:
        yield url
        return
    if find_redis_server() is None:
        pytest.skip(NO_REDIS_SERVER)
    with RedisServer.start_new(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may pause, kill and restart."""
    if find_redis_server() is None:
        pytest.skip(NO_REDIS_SERVER)
    with RedisServer.start_new(tmp_path_factory.mktemp("private-redis")) as server:
        yield server


@pytest.fixture
def namespace() -> str:
    """A key namespace no other test (or run) uses."""
    return f"test-{uuid.uuid4().hex[:12]}"
