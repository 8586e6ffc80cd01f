"""docs/configuration.md against the ``Settings`` model: the reference cannot drift.

Every setting must have its own table row (first cell the env name, then a default and a
meaning), and every ``EMBEDPIPE_...`` name on the page must be a setting. Names that are not
settings (the ``embed`` client's key, the test suite's knobs) belong on other pages. Two forms
are allowed in prose: the bare prefix ``EMBEDPIPE_`` and a group wildcard such as
``EMBEDPIPE_CACHE__*``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo

from embedpipe.settings import Settings

CONFIGURATION_MD = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

_MENTION = re.compile(r"EMBEDPIPE_[A-Z0-9_]*\*?")
_ROW = re.compile(r"^\|\s*`(EMBEDPIPE_[A-Z0-9_]+)`\s*\|(.*)$")


def _keys(name: str, field: FieldInfo) -> tuple[list[str], bool]:
    """The keys a field is read under, and whether they are aliases (else just its name)."""
    alias = field.validation_alias or field.alias
    if isinstance(alias, str):
        return [alias], True
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)], True
    return [name], False


def env_names(
    model: type[BaseModel] = Settings, prefix: str | None = None, delimiter: str | None = None
) -> set[str]:
    """Every environment variable the model reads, nested groups spelled with the delimiter.

    As pydantic-settings reads them: a top-level alias is the whole name (no prefix); a nested
    field is ``<prefix><GROUP><delimiter><FIELD>``.
    """
    top = prefix is None or delimiter is None
    if prefix is None or delimiter is None:
        config = Settings.model_config
        prefix = str(config.get("env_prefix") or "")
        delimiter = str(config.get("env_nested_delimiter") or "__")
    names: set[str] = set()
    for name, field in model.model_fields.items():
        group = field.annotation
        keys, aliased = _keys(name, field)
        for key in keys:
            full = key.upper() if top and aliased else f"{prefix}{key.upper()}"
            if isinstance(group, type) and issubclass(group, BaseModel):
                names |= env_names(group, f"{full}{delimiter}", delimiter)
            else:
                names.add(full)
    return names


def problems(page: str, settings: set[str]) -> list[str]:
    """What is wrong with a configuration page, one line per problem (empty: nothing)."""
    found: list[str] = []
    rows: dict[str, int] = {}
    in_code = False
    for number, line in enumerate(page.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        row = None if in_code else _ROW.match(line)
        if row is not None:
            name = row.group(1)
            rows[name] = rows.get(name, 0) + 1
            cells = [cell.strip() for cell in row.group(2).split("|")]
            if len(cells) < 3 or not cells[0] or not cells[1]:
                found.append(f"line {number}: {name} needs a default and a meaning")
        for mention in _MENTION.findall(line):
            if mention == "EMBEDPIPE_":
                continue
            if mention.endswith("*"):
                if not any(setting.startswith(mention[:-1]) for setting in settings):
                    found.append(f"line {number}: {mention} matches no setting")
            elif mention not in settings:
                found.append(f"line {number}: {mention} is not a setting")
    for name in sorted(settings):
        if name not in rows:
            found.append(f"{name} has no row")
        elif rows[name] > 1:
            found.append(f"{name} has {rows[name]} rows")
    return found


def test_every_setting_has_one_row_and_every_name_is_a_setting() -> None:
    assert problems(CONFIGURATION_MD.read_text(encoding="utf-8"), env_names()) == []


def test_env_names_follow_the_settings_prefix_and_delimiter() -> None:
    names = env_names()
    assert {"EMBEDPIPE_HOST", "EMBEDPIPE_REDIS_URL", "EMBEDPIPE_CACHE__TTL_SECONDS"} <= names
    # Properties (distributed, effective_broker_url) are not settings; groups are not either.
    assert "EMBEDPIPE_DISTRIBUTED" not in names
    assert "EMBEDPIPE_CACHE" not in names


def test_a_derived_nested_name_is_what_pydantic_settings_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "EMBEDPIPE_JOBS__CHUNK_SIZE" in env_names()
    monkeypatch.setenv("EMBEDPIPE_JOBS__CHUNK_SIZE", "7")
    assert Settings(_env_file=None).jobs.chunk_size == 7


class _Group(BaseModel):
    size: int = 1


class _Model(BaseModel):
    port: int = 1
    group: _Group = _Group()


_PAGE = """\
Prose may name the prefix `EMBEDPIPE_` and a group: `EMBEDPIPE_GROUP__*`.

| setting | default | meaning |
| --- | --- | --- |
| `EMBEDPIPE_PORT` | `1` | The port. |
| `EMBEDPIPE_GROUP__SIZE` | `1` | The size. |
"""


def test_the_check_passes_a_complete_page() -> None:
    settings = env_names(_Model, "EMBEDPIPE_", "__")
    assert settings == {"EMBEDPIPE_PORT", "EMBEDPIPE_GROUP__SIZE"}
    assert problems(_PAGE, settings) == []


def test_the_check_fails_a_dropped_row() -> None:
    page = _PAGE.replace("| `EMBEDPIPE_GROUP__SIZE` | `1` | The size. |\n", "")
    assert problems(page, env_names(_Model, "EMBEDPIPE_", "__")) == [
        "EMBEDPIPE_GROUP__SIZE has no row"
    ]


def test_the_check_fails_a_name_that_is_not_a_setting() -> None:
    page = _PAGE + "Tests read `EMBEDPIPE_TEST_REDIS_URL`; `EMBEDPIPE_NOPE__*` too.\n"
    assert problems(page, env_names(_Model, "EMBEDPIPE_", "__")) == [
        "line 7: EMBEDPIPE_TEST_REDIS_URL is not a setting",
        "line 7: EMBEDPIPE_NOPE__* matches no setting",
    ]


def test_the_check_fails_a_row_without_a_meaning_or_twice() -> None:
    page = _PAGE + "| `EMBEDPIPE_PORT` | `1` | |\n"
    assert problems(page, env_names(_Model, "EMBEDPIPE_", "__")) == [
        "line 7: EMBEDPIPE_PORT needs a default and a meaning",
        "EMBEDPIPE_PORT has 2 rows",
    ]
