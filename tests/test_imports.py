"""The code's import graph: every module imports, no circle, and the folders depend one way.

The graph is read from the source (``ast``): every ``import`` of a ``swarmtrain`` module, those
under ``if TYPE_CHECKING:`` included (a circle that only the type checker sees is still a circle).
A package's ``__init__`` importing its own submodules is an edge like any other; the implicit
"a submodule's import runs its package's ``__init__`` first" is not counted.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = "swarmtrain.cli.main"
"""The ``swarmtrain`` command: it starts one process of a kind (gateway, scheduler, projector, a peer)
and imports only the service it starts, inside the function that starts it, so that ``swarmtrain
--help`` and every process load no more than they run. The one module allowed imports in a function."""


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in ("libs", "services"):
        for path in sorted((ROOT / top).glob("*/swarmtrain/**/*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts[parts.index("swarmtrain") :]
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> Iterator[tuple[str, bool, int]]:
    """(imported swarmtrain module, inside a function body, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, bool, int]]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("swarmtrain."):
                        yield alias.name, in_function, child.lineno
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = _package(name, path).split(".")
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if not base.startswith("swarmtrain"):
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    yield (sub if sub in MODULES else base), in_function, child.lineno
            yield from visit(child, nested)

    yield from visit(tree, False)


GRAPH: dict[str, set[str]] = {m: set() for m in MODULES}
IN_FUNCTIONS: list[tuple[str, str, int]] = []
for _name, _path in MODULES.items():
    for _target, _in_function, _line in _imports(_name, _path):
        if _target in MODULES and _target != _name:
            GRAPH[_name].add(_target)
        if _in_function:
            IN_FUNCTIONS.append((_name, _target, _line))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_graph_is_read() -> None:
    assert {"swarmtrain.common.events", "swarmtrain.training.rounds", "swarmtrain.peer.service"} <= set(MODULES)
    assert "swarmtrain.common.events" in GRAPH["swarmtrain.training.rounds"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_no_import_circle() -> None:
    assert _cycles(GRAPH) == []


def test_the_circle_check_finds_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_are_at_the_top_of_the_file() -> None:
    """No import hides in a function body (where it would dodge a circle), but the launcher's."""
    assert [(m, t, line) for m, t, line in IN_FUNCTIONS if m != LAUNCHER] == []


def test_the_libraries_and_other_services_do_not_import_the_peer() -> None:
    """The peer is one process: what others need of its code lives in ``libs/training``."""
    wrong = {m: sorted(t for t in GRAPH[m] if t.startswith("swarmtrain.peer")) for m in MODULES}
    assert {m: t for m, t in wrong.items() if t and not m.startswith("swarmtrain.peer") and m != LAUNCHER} == {}


def test_the_libraries_import_no_service() -> None:
    libs = [m for m, p in MODULES.items() if p.is_relative_to(ROOT / "libs")]
    services = (
        "swarmtrain.gateway",
        "swarmtrain.scheduler",
        "swarmtrain.peer",
        "swarmtrain.projector",
        "swarmtrain.cli",
    )
    assert {
        m: sorted(t for t in GRAPH[m] if t.startswith(services))
        for m in libs
        if any(t.startswith(services) for t in GRAPH[m])
    } == {}
