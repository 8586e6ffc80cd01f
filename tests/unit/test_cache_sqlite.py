"""The embedded L2 on a real SQLite file, the tiered cache over it, and the factory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from embedpipe.cache import MemoryTier, SqliteTier, TieredCache, open_cache
from embedpipe.settings import CacheSettings, Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def errors_total() -> float:
    return REGISTRY.get_sample_value("embedpipe_cache_errors_total", {"tier": "l2"}) or 0.0


def value(i: int, size: int = 1536) -> bytes:
    return i.to_bytes(4, "little") * (size // 4)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "cache.sqlite3"  # the data dir does not exist yet


@pytest.fixture
async def make_tier(path: Path, clock: FakeClock) -> AsyncIterator[Callable[..., SqliteTier]]:
    tiers: list[SqliteTier] = []

    def make(**kwargs: object) -> SqliteTier:
        options: dict[str, object] = {"max_bytes": 0, "ttl_seconds": 0, "clock": clock}
        options.update(kwargs)
        tier = SqliteTier(path, **options)  # type: ignore[arg-type]
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        await tier.close()


async def test_round_trip_and_stats(make_tier: Callable[..., SqliteTier]) -> None:
    tier = await make_tier().open()
    assert await tier.get_many([]) == []
    await tier.set_many({"a": value(1), "b": value(2)})
    assert await tier.get_many(["a", "x", "b"]) == [value(1), None, value(2)]
    stats = await tier.stats()
    assert (stats.name, stats.hits, stats.misses, stats.errors) == ("l2", 2, 1, 0)
    assert stats.entries == 2 and stats.bytes is not None and stats.bytes > 2 * 1536
    assert stats.healthy


async def test_many_keys_are_read_in_chunks(make_tier: Callable[..., SqliteTier]) -> None:
    tier = await make_tier().open()
    items = {f"k{i}": value(i, 8) for i in range(1203)}
    await tier.set_many(items)
    keys = [*items, "missing"]
    assert await tier.get_many(keys) == [*items.values(), None]


async def test_survives_a_restart(make_tier: Callable[..., SqliteTier]) -> None:
    first = await make_tier().open()
    await first.set_many({"a": value(1)})
    await first.close()
    second = await make_tier().open()
    assert await second.get_many(["a"]) == [value(1)]


async def test_expired_entries_are_misses(
    make_tier: Callable[..., SqliteTier], clock: FakeClock
) -> None:
    tier = await make_tier(ttl_seconds=60).open()
    await tier.set_many({"a": value(1)})
    clock.now += 59
    assert await tier.get_many(["a"]) == [value(1)]
    clock.now += 1
    assert await tier.get_many(["a"]) == [None]
    await tier.set_many({"a": value(2)})  # rewriting starts a new TTL
    assert await tier.get_many(["a"]) == [value(2)]


async def test_zero_ttl_never_expires(
    make_tier: Callable[..., SqliteTier], clock: FakeClock
) -> None:
    tier = await make_tier(ttl_seconds=0).open()
    await tier.set_many({"a": value(1)})
    clock.now += 10 * 365 * 86400
    assert await tier.get_many(["a"]) == [value(1)]


async def test_expired_entries_are_deleted_by_maintenance(
    make_tier: Callable[..., SqliteTier], clock: FakeClock
) -> None:
    tier = await make_tier(ttl_seconds=60, maintain_every=10).open()
    await tier.set_many({f"old{i}": value(i) for i in range(5)})
    clock.now += 61
    await tier.set_many({f"new{i}": value(i) for i in range(10)})
    assert (await tier.stats()).entries == 10


async def test_evicts_the_oldest_entries_when_over_max_bytes(
    make_tier: Callable[..., SqliteTier], clock: FakeClock
) -> None:
    max_bytes = 400_000
    tier = await make_tier(max_bytes=max_bytes, maintain_every=50).open()
    for batch in range(20):  # ~30 KB per batch, 600 KB in all
        clock.now += 1
        await tier.set_many({f"k{batch}-{i}": value(i) for i in range(20)})
    stats = await tier.stats()
    assert stats.bytes is not None and stats.bytes <= max_bytes + 50 * 2048
    assert stats.entries is not None and 150 < stats.entries < 400
    assert await tier.get_many(["k0-0", "k0-19"]) == [None, None]
    assert await tier.get_many(["k19-0", "k19-19"]) == [value(0), value(19)]


async def test_a_hit_refreshes_an_entry_in_the_eviction_order(
    make_tier: Callable[..., SqliteTier], clock: FakeClock
) -> None:
    tier = await make_tier(max_bytes=200_000, maintain_every=20, touch_after=10).open()
    await tier.set_many({"hot": value(7)})
    for batch in range(15):  # ~450 KB, the first half of it is evicted
        clock.now += 11
        assert await tier.get_many(["hot"]) == [value(7)]
        await tier.set_many({f"k{batch}-{i}": value(i) for i in range(20)})
    assert await tier.get_many(["hot", "k0-0"]) == [value(7), None]


@pytest.fixture
def garbage_file(path: Path) -> Path:
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(8192))  # not a database
    return path


@pytest.mark.usefixtures("garbage_file")
async def test_an_unreadable_file_means_misses_and_errors_not_exceptions(
    make_tier: Callable[..., SqliteTier], caplog: pytest.LogCaptureFixture
) -> None:
    before = errors_total()
    tier = await make_tier().open()
    assert await tier.get_many(["a", "b"]) == [None, None]
    await tier.set_many({"a": value(1)})
    stats = await tier.stats()
    assert not stats.healthy and stats.errors == 3 and stats.misses == 2
    assert stats.entries is None
    assert errors_total() - before == 3
    assert "cannot open" in caplog.text


async def test_after_close_it_answers_misses(make_tier: Callable[..., SqliteTier]) -> None:
    tier = await make_tier().open()
    await tier.set_many({"a": value(1)})
    await tier.close()
    await tier.close()  # idempotent
    assert await tier.get_many(["a"]) == [None]
    assert tier.errors == 1


async def test_clear_removes_everything(make_tier: Callable[..., SqliteTier]) -> None:
    tier = await make_tier().open()
    await tier.set_many({f"k{i}": value(i) for i in range(100)})
    await tier.clear()
    assert await tier.get_many(["k1"]) == [None]
    assert (await tier.stats()).entries == 0


async def test_tiered_promotes_l2_hits_into_l1(make_tier: Callable[..., SqliteTier]) -> None:
    l2 = await make_tier().open()
    await l2.set_many({"a": value(1)})
    cache = TieredCache(MemoryTier(1 << 20), l2)
    await cache.set_many({"b": value(2)})
    assert await cache.get_many(["a", "b", "c", "a"]) == [
        (value(1), "l2"),
        (value(2), "l1"),
        None,
        (value(1), "l2"),
    ]
    assert l2.misses == 1 and l2.hits == 1  # one lookup for the two "a"s, none for "b"
    assert await cache.get_many(["a"]) == [(value(1), "l1")]
    assert [s.name for s in await cache.stats()] == ["l1", "l2"]


async def test_open_cache_embedded_uses_sqlite_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_url="")
    cache = await open_cache(settings)
    try:
        assert isinstance(cache.l2, SqliteTier)
        assert cache.l1.max_bytes == settings.cache.l1_max_bytes
        await cache.set_many({"a": value(1)})
        assert (tmp_path / "data" / "cache.sqlite3").exists()
    finally:
        await cache.close()


async def test_open_cache_disabled_has_no_tiers(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url="", cache=CacheSettings(enabled=False))
    cache = await open_cache(settings)
    await cache.set_many({"a": value(1)})
    assert await cache.get_many(["a"]) == [None]
    assert cache.l2 is None and cache.l1.max_bytes == 0
    await cache.close()


async def test_the_data_dir_and_the_cache_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tier = await SqliteTier(data / "cache.sqlite3", 1 << 20, 3600).open()
    try:
        await tier.set_many({"k": b"v" * 16})
        files = [
            data / name for name in ("cache.sqlite3", "cache.sqlite3-wal", "cache.sqlite3-shm")
        ]
        assert all(path.exists() for path in files)
        assert oct(data.stat().st_mode & 0o777) == oct(0o700)
        assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(0o600)}
    finally:
        await tier.close()


async def test_an_older_installs_modes_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "old"
    data.mkdir()
    data.chmod(0o755)
    (data / "cache.sqlite3").touch()  # an empty file is an empty SQLite database
    (data / "cache.sqlite3").chmod(0o644)
    tier = await SqliteTier(data / "cache.sqlite3", 1 << 20, 3600).open()
    try:
        assert oct(data.stat().st_mode & 0o777) == oct(0o700)
        assert oct((data / "cache.sqlite3").stat().st_mode & 0o777) == oct(0o600)
    finally:
        await tier.close()
