"""The deploy files as the tests read them: deploy/compose.yaml interpolated with .env.example
the way ``docker compose --env-file .env`` does, the environment each service would get
(mapped onto loopback for processes started without Docker), and the Dockerfile's
instructions."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from embedpipe.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
# The slim image (ONNX Runtime, no torch), built from the full one.
SLIM_DOCKERFILE = DEPLOY / "slim.Dockerfile"
SLIM_COMPOSE_FILE = DEPLOY / "compose.slim.yaml"
NGINX_CONF = DEPLOY / "nginx" / "embedpipe.conf"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME and $$.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>\w+))"
)


class MissingVariable(ValueError):
    """A variable compose would refuse to interpolate (``${NAME:?why}``, or one not set)."""


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """``KEY=VALUE`` lines (comments and blank lines skipped; optional quotes removed)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{path.name}:{number}: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def variables_used(text: str) -> dict[str, str | None]:
    """Every variable a compose file interpolates, with its ``:-``/``-`` default if any."""
    used: dict[str, str | None] = {}
    for match in _VARIABLE.finditer(text):
        name = match["braced"] or match["bare"]
        if name:
            default = match["arg"] if match["op"] in (":-", "-") else None
            used[name] = default if used.get(name) is None else used[name]
    return used


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """One string, as compose interpolates it; an unset variable without a default is an
    error here (compose would only warn and use an empty string)."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg, value = match["op"], match["arg"], variables.get(name)
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        if (op == ":?" and not value) or (op == "?" and value is None):
            raise MissingVariable(f"{name}: {arg}")
        if value is None:
            raise MissingVariable(f"{name} is not set")
        return value

    return _VARIABLE.sub(replace, text)


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def raw_compose() -> dict[str, Any]:
    """The compose file as YAML (anchors and ``<<`` merges resolved), not interpolated."""
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


# The env_file of the embedpipe services: the .env the user passes with --env-file.
DOT_ENV_FILE = "../.env"


def compose(overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file with the values of .env.example, as a user's first ``up`` sees it
    (plus ``overrides``: what that user changed in .env). As ``docker compose config`` shows
    it, a service's env_file (that same .env) is merged into its environment, which wins."""
    variables = {**read_env_file(), **(overrides or {})}
    interpolated: dict[str, Any] = _interpolate_tree(raw_compose(), variables)
    for name, service in interpolated["services"].items():
        env_file = service.pop("env_file", None)
        if env_file is None:
            continue
        assert env_file == DOT_ENV_FILE, f"{name}: env_file {env_file!r}"
        service["environment"] = {**variables, **environment(service)}
    return interpolated


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (map or ``KEY=VALUE`` list form) as strings."""
    given = service.get("environment") or {}
    if isinstance(given, list):
        given = dict(item.split("=", 1) for item in given)
    return {key: "" if value is None else str(value) for key, value in given.items()}


def setting_env_names() -> set[str]:
    """Every ``EMBEDPIPE_*`` variable the Settings schema reads (nested groups with ``__``)."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            names.update(f"EMBEDPIPE_{name}__{sub}".upper() for sub in group.model_fields)
        else:
            names.add(f"EMBEDPIPE_{name}".upper())
    return names


# Settings a process helper (ServerProcess, WorkerProcess) chooses itself on loopback.
_PORT_SETTINGS = ("EMBEDPIPE_PORT", "EMBEDPIPE_JOBS__WORKER_METRICS_PORT")


def loopback_environment(
    stack: Mapping[str, Any], service: str, addresses: Mapping[str, str], data_dir: Path
) -> dict[str, str]:
    """The environment compose gives ``service``, for a plain process on this machine: every
    ``//<service>:<port>`` in a value points at ``addresses[<service>]`` instead, the host
    is loopback, the data dir a local folder, and ports are left to the process helpers.
    Nothing else changes, so the process runs with the compose file's settings."""
    env = environment(stack["services"][service])
    for name in _PORT_SETTINGS:
        env.pop(name, None)
    services = set(stack["services"])
    for key, value in env.items():
        for target, address in addresses.items():
            # The password in the URL too: the stand-in Redis servers have none.
            value = re.sub(rf"//(?:[^/@]*@)?{re.escape(target)}:\d+", f"//{address}", value)
        unmapped = [name for name in services if re.search(rf"//{re.escape(name)}[:/]", value)]
        assert not unmapped, f"{service}: {key} names {unmapped}, which has no stand-in"
        env[key] = value
    env["EMBEDPIPE_HOST"] = "127.0.0.1"
    env["EMBEDPIPE_DATA_DIR"] = str(data_dir)
    return env


def redis_options(service: Mapping[str, Any]) -> dict[str, str]:
    """``redis-server --name value ...`` of a compose service, as CONFIG SET pairs."""
    command = [str(part) for part in service["command"]]
    assert command[0] == "redis-server", command
    options = command[1:]
    assert len(options) % 2 == 0 and all(o.startswith("--") for o in options[::2]), command
    return {name[2:]: value for name, value in zip(options[::2], options[1::2], strict=True)}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to

    def exec_form(self) -> list[str]:
        """The JSON array of CMD / ENTRYPOINT / HEALTHCHECK ... CMD."""
        start = self.args.index("[")
        parsed: list[str] = json.loads(self.args[start:])
        return parsed


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and directives dropped."""
    instructions: list[Instruction] = []
    pending = ""
    stage = -1
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines even inside a continued instruction.
        pending += (" " if pending else "") + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def image_healthcheck() -> list[str]:
    """The argv of the image's HEALTHCHECK (exec form, last stage)."""
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    final = max(i.stage for i in instructions)
    (check,) = [i for i in instructions if i.keyword == "HEALTHCHECK" and i.stage == final]
    return check.exec_form()


def nginx_binary() -> str:
    """Debian's nginx (in /usr/sbin, which a non-root PATH may lack); missing, a developer's
    run skips the nginx checks and CI's fails, where a skip would hide a missing install."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    message = "nginx is missing: `make test` installs it (Debian package nginx)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)
