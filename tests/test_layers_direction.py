"""The library's direction, read from the code (AST imports, lazy ones included):

- no import cycle between the rooms of ``varlide/`` (a room: a top-level module or a
  subpackage);
- the weights mechanism (``varlide/weights/``) imports nothing of varlide but storage;
- models, priors and iqa never import the resolver, the MLflow registry, the run planner,
  the engine or the run store;
- no function in ``varlide/`` is over 80 lines;
- modules under ``benchmarks/`` import only the standard library, torch, numpy and
  open_clip at module level (they run on a bare GPU machine).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "varlide"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    nodes = tree.body if top_level_only else _runtime_nodes(tree)
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (type hints, never imported)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "varlide" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _room_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        src = _room(name)
        if src is None:
            continue
        for target in _imports(path):
            dst = _room(target)
            if dst and dst != src and (target in modules or dst in modules):
                graph.setdefault(src, set()).add(dst)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_search_finds_a_cycle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle_between_the_rooms_of_varlide():
    cycle = _cycle(_room_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_weights_mechanism_imports_only_storage():
    for path in (PKG / "weights").glob("*.py"):
        ours = {m for m in _imports(path) if m.startswith("varlide")}
        bad = {m for m in ours if not m.startswith(("varlide.weights", "varlide.storage"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("room", ["models", "priors", "iqa"])
def test_backends_never_import_what_sits_above_them(room):
    above = ("varlide.resolver", "varlide.registry_mlflow", "varlide.run", "varlide.engine",
             "varlide.storage.runstore")
    for path in (PKG / room).rglob("*.py"):
        bad = {m for m in _imports(path) if m == above or m.startswith(above)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_benchmarks_import_only_torch_numpy_open_clip_at_module_level():
    allowed = {"torch", "numpy", "open_clip", "benchmarks", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tops = {m.split(".")[0] for m in _imports(path, top_level_only=True) if m}
        bad = tops - allowed - stdlib
        assert not bad, f"benchmarks/{path.name} imports {sorted(bad)} at module level"


def test_no_function_in_varlide_is_over_80_lines():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
