"""The architecture as tests: the core never imports the HTTP layer, nothing imports the CLI,
and no modules import each other around a circle, lazily or not.

Imports are read with ``ast`` from the source, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "src" / "embedpipe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[str]:
    """Every embedpipe module ``path`` imports, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target
            # ``from embedpipe.api import app`` imports the module embedpipe.api.app too.
            yield from (f"{target}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    sources = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        graph[module] = {
            name
            for name in _imports(path)
            if name.startswith("embedpipe") and name in sources and name != module
        }
    return graph


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_sources_are_found() -> None:
    graph = _graph()
    assert "embedpipe.api.app" in graph and "embedpipe.runtime" in graph
    assert "embedpipe.runtime" in graph["embedpipe.api.app"]


@pytest.mark.parametrize(
    ("layer", "allowed_outside"),
    [
        # The HTTP layer sits on the core; the core never reaches back up. Only the CLI, the
        # composition root of every process kind, hands settings to ``create_app``.
        ("embedpipe.api", {"embedpipe.api", "embedpipe.cli"}),
        # The CLI is a composition root: only ``python -m embedpipe`` starts it.
        ("embedpipe.cli", {"embedpipe.__main__"}),
    ],
)
def test_no_module_outside_a_layer_imports_it(layer: str, allowed_outside: set[str]) -> None:
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if not any(_inside(module, allowed) for allowed in allowed_outside)
        for target in targets
        if _inside(target, layer)
    )
    assert not offenders, offenders


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, [" -> ".join(cycle) for cycle in cycles]
