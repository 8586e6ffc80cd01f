"""Publishing an ONNX export: built once, complete or absent, whoever asks at the same time.

The builders here write small files instead of exporting a model; the model itself is
exported in tests/integration/test_onnx_backend.py."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from embedpipe.embedders.onnx_export import METADATA_FILE, MODEL_FILE, export_id, publish
from embedpipe.errors import ModelLoadError


def _slow_build(out: Path, marker: Path) -> None:
    with marker.open("a") as log:
        log.write("built\n")
    (out / MODEL_FILE).write_bytes(b"graph")
    time.sleep(0.3)  # long enough for the other builders to be waiting on the lock
    (out / METADATA_FILE).write_text(json.dumps({"variant": "fp32"}))


def _publish_in_process(target: str, marker: str) -> None:
    publish(Path(target), lambda out: _slow_build(out, Path(marker)))


def test_concurrent_processes_build_once_and_all_see_the_complete_export(
    tmp_path: Path,
) -> None:
    target = tmp_path / "onnx" / "abc-fp32"
    marker = tmp_path / "builds.log"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_publish_in_process, args=(str(target), str(marker)))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert marker.read_text() == "built\n"
    assert (target / MODEL_FILE).read_bytes() == b"graph"
    assert sorted(path.name for path in target.parent.iterdir()) == [".abc-fp32.lock", "abc-fp32"]


def test_concurrent_threads_build_once(tmp_path: Path) -> None:
    target = tmp_path / "abc-int8"
    marker = tmp_path / "builds.log"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(publish(target, _builder(marker))))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [target] * 3
    assert marker.read_text() == "built\n"


def _builder(marker: Path) -> Callable[[Path], None]:
    return lambda out: _slow_build(out, marker)


def test_a_failed_build_leaves_nothing_and_the_next_start_builds_again(tmp_path: Path) -> None:
    target = tmp_path / "abc-fp32"

    def failing(out: Path) -> None:
        (out / MODEL_FILE).write_bytes(b"half a graph")
        raise RuntimeError("killed mid-export")

    with pytest.raises(RuntimeError, match="killed mid-export"):
        publish(target, failing)
    assert not target.exists()
    assert [path.name for path in tmp_path.iterdir()] == [".abc-fp32.lock"]

    marker = tmp_path / "builds.log"
    assert publish(target, lambda out: _slow_build(out, marker)) == target
    assert (target / METADATA_FILE).is_file()


def test_leftovers_of_a_dead_builder_are_replaced(tmp_path: Path) -> None:
    target = tmp_path / "abc-fp32"
    stale_scratch = tmp_path / ".abc-fp32.tmp-dead"
    stale_scratch.mkdir()
    target.mkdir()  # a directory without metadata is not an export
    (target / MODEL_FILE).write_bytes(b"truncated")
    publish(target, lambda out: _slow_build(out, tmp_path / "builds.log"))
    assert not stale_scratch.exists()
    assert (target / MODEL_FILE).read_bytes() == b"graph"


def test_a_build_that_writes_no_metadata_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "abc-fp32"

    def no_metadata(out: Path) -> None:
        (out / MODEL_FILE).write_bytes(b"graph")

    with pytest.raises(ModelLoadError, match="wrote no"):
        publish(target, no_metadata)
    assert not target.exists()


def test_an_existing_export_is_reused_without_building(tmp_path: Path) -> None:
    target = tmp_path / "abc-fp32"
    publish(target, lambda out: _slow_build(out, tmp_path / "builds.log"))

    def must_not_run(out: Path) -> None:
        raise AssertionError("rebuilt an existing export")

    assert publish(target, must_not_run) == target


def test_export_id_follows_the_weights_pooling_and_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text("[]")
    (tmp_path / "tokenizer.json").write_text('{"model": "wordpiece"}')
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    first = export_id(tmp_path, "a" * 64)
    assert export_id(tmp_path, "a" * 64) == first
    assert export_id(tmp_path, "b" * 64) != first
    (tmp_path / ".cache").mkdir()  # hidden: a hub download's bookkeeping, not the model
    (tmp_path / ".cache" / "lock").write_text("x")
    assert export_id(tmp_path, "a" * 64) == first
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    pooling_changed = export_id(tmp_path, "a" * 64)
    assert pooling_changed != first
    (tmp_path / "tokenizer.json").write_text('{"model": "bpe"}')
    assert export_id(tmp_path, "a" * 64) not in (first, pooling_changed)
