"""The one table from domain errors to what clients see (routes and batch lines alike)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import embedpipe
from embedpipe.error_status import ERROR_STATUS, ErrorStatus, status_for
from embedpipe.errors import (
    EmbedpipeError,
    InvalidInput,
    NotFound,
    Overloaded,
    TooLarge,
    UpstreamError,
    UpstreamFailed,
    UpstreamRateLimited,
)


def _all_subclasses(cls: type[EmbedpipeError]) -> set[type[EmbedpipeError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _all_subclasses(sub)
    return found


def test_every_domain_error_has_an_explicit_status() -> None:
    # Import every module first: a subclass defined anywhere in the package must be listed.
    for module in pkgutil.walk_packages(embedpipe.__path__, "embedpipe."):
        if module.name not in ("embedpipe.__main__",):
            importlib.import_module(module.name)
    unlisted = sorted(cls.__qualname__ for cls in _all_subclasses(EmbedpipeError))
    unlisted = [name for name in unlisted if name not in {c.__qualname__ for c in ERROR_STATUS}]
    assert not unlisted, f"add these to embedpipe.error_status.ERROR_STATUS: {unlisted}"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (InvalidInput("bad"), (400, "invalid_request_error")),
        # A subclass gets its own entry, whatever the order of the table.
        (TooLarge("big"), (413, "invalid_request_error")),
        (NotFound("gone"), (404, "invalid_request_error")),
        (Overloaded("busy", retry_after=2.0), (503, "server_overloaded")),
        (UpstreamRateLimited("slow down", retry_after=3.0), (429, "rate_limit_error")),
        (UpstreamFailed("down"), (502, "upstream_error")),
        (EmbedpipeError("other"), (500, "server_error")),
    ],
)
def test_status_of_an_error(error: EmbedpipeError, expected: tuple[int, str]) -> None:
    assert status_for(error) == ErrorStatus(*expected)


def test_an_unlisted_subclass_takes_its_nearest_ancestors_status() -> None:
    class StrangeUpstreamAnswer(UpstreamError):
        pass

    assert status_for(StrangeUpstreamAnswer("odd")) == (502, "upstream_error")
