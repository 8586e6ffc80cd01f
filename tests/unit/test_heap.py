"""release_free_heap: glibc's malloc_trim where there is one, nothing elsewhere."""

from __future__ import annotations

import platform

import pytest

from embedpipe.heap import release_free_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_free_heap_is_handed_back_on_glibc() -> None:
    garbage = [bytes(200) for _ in range(100_000)]  # small blocks: the heap, not mmap
    del garbage
    assert release_free_heap() is True
    assert release_free_heap() is True  # nothing left to give back is no error


def test_without_a_c_library_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    assert release_free_heap() is False
