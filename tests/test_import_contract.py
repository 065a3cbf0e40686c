"""The import contract (pyproject.toml's [tool.importlinter], which .ci/run checks with `lint-imports`) holds, and no
module of `wan` or `nabla` reaches itself through its imports (no cycles, lazy imports inside functions included)."""

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contract_holds():
    # what the `lint-imports` command runs, by this interpreter: inside a venv made with --system-site-packages, pip
    # puts no such command in the venv where the base interpreter already has import-linter
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    result = subprocess.run([sys.executable, "-c", lint], check=False, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


def _cycle(graph: grimp.ImportGraph, modules: set[str]) -> list[str] | None:
    """A cycle of imports among `modules`, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module) & modules):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        state[module] = 2
        path.pop()
        return None

    return next((found for module in sorted(modules) if module not in state and (found := visit(module))), None)


def test_no_import_cycles():
    graph = grimp.build_graph("wan", "nabla")
    modules = {m for m in graph.modules if m.startswith(("wan", "nabla"))}
    assert len(modules) > 40
    assert _cycle(graph, modules) is None, " -> ".join(_cycle(graph, modules))


def test_the_cycle_search_finds_one():
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    assert _cycle(graph, {"a.x", "a.y", "a.z"}) is None
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycle(graph, {"a.x", "a.y", "a.z"}) == ["a.x", "a.y", "a.z", "a.x"]
