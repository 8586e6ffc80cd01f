"""Every relative link in the README and the docs pages points to a file that exists, and every
``#anchor`` to a heading of the page it names (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*$")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in _prose(page.read_text(encoding="utf-8")):
        heading = _HEADING.match(line)
        if heading:
            found.add(anchor(heading.group(1)))
    return found


def broken_links(page: Path) -> list[str]:
    broken: list[str] = []
    for line in _prose(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{target}: no such file")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_point_to_files_and_headings_that_exist(page: Path) -> None:
    assert broken_links(page) == []


def test_the_checker_sees_a_broken_file_and_a_broken_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Scale out: Redis, brokers and workers\n")
    page.write_text(
        "[ok](other.md#scale-out-redis-brokers-and-workers) [gone](missing.md) "
        "[bad](other.md#nope) [web](https://example.com/x.md)\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md: no such file", "other.md#nope: no such heading"]


def test_anchor_follows_github() -> None:
    assert anchor("Micro-batching (`EMBEDPIPE_BATCHING__*`)") == (
        "micro-batching-embedpipe_batching__"
    )
    assert anchor("The simple API: `POST /embed` and `POST /embed/batch`") == (
        "the-simple-api-post-embed-and-post-embedbatch"
    )
