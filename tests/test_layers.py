"""The package's layers: each imports only the ones below it, with no import cycle.

Read from the source text (``ast``), so a violation is found without importing anything.
Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ctzarr"

#: rank of each layer, lowest first (DESIGN.md "Package layout"); a module may import modules
#: of its own rank or lower. ``io`` sits below ``sources`` because NIfTI files and layouts are
#: read from buckets and servers through io's URL helpers; ``catalog`` below ``read`` because
#: ``open_collection`` resolves catalog names through it; ``run`` (the cluster runner) below
#: ``write`` and ``read`` because it runs the task functions they hand it and imports nothing
#: above it.
LAYERS: dict[str, int] = {
    "ctzarr.errors": 0,
    "ctzarr._version": 0,
    "ctzarr.config": 0,
    "ctzarr.extras": 0,
    "ctzarr.model": 1,
    "ctzarr.io": 2,
    "ctzarr.sources": 3,
    "ctzarr.catalog": 4,
    "ctzarr.run": 4,
    "ctzarr.write": 5,
    "ctzarr.read": 6,
    "ctzarr.train": 7,
    "ctzarr.serve": 8,
    "ctzarr.testing": 9,
    "ctzarr.demo": 10,
    "ctzarr.cli": 11,
    "ctzarr": 12,  # the package's __init__: the public surface
}

#: modules that may defer imports of ctzarr modules into functions: the package's __init__ and
#: the CLI keep ``import ctzarr`` and ``ctzarr --help`` from loading the reading side (startup
#: time), which is not a cycle being dodged; so does the xarray backend, which xarray imports
#: whenever it lists its engines, for any file it opens.
DEFERRING = ("ctzarr", "ctzarr.cli", "ctzarr.read.xarray_backend")


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    if not best:
        raise AssertionError(f"{module}: in no layer; add it to LAYERS in {__file__}")
    return LAYERS[best]


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported ctzarr module, at module level?, line) of every runtime import in a file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.Import):
                found.extend(
                    (a.name, top, child.lineno) for a in child.names if a.name.startswith("ctzarr")
                )
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                if target == "ctzarr" or target.startswith("ctzarr."):
                    # ``from ctzarr.read import case`` imports the module ctzarr.read.case
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        is_module = (SRC.parent / Path(*sub.split("."))).with_suffix(
                            ".py"
                        ).exists() or (SRC.parent / Path(*sub.split(".")) / "__init__.py").exists()
                        found.append((sub if is_module else target, top, child.lineno))
            elif isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
            ):
                visit(child, False if not isinstance(child, ast.ClassDef) else top)
            else:
                visit(child, top)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_downward(path: Path) -> None:
    module = _module_name(path)
    mine = _layer(module)
    upward = [
        f"line {line}: {target} (layer {_layer(target)})"
        for target, _, line in _imports(path)
        if _layer(target) > mine and not module.startswith(target + ".") and target != "ctzarr"
    ]
    assert not upward, f"{module} (layer {mine}) imports upward: {upward}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_deferred_imports_of_our_own_modules(path: Path) -> None:
    module = _module_name(path)
    if module in DEFERRING or module.startswith("ctzarr.cli."):
        return
    nested = [f"line {line}: {t}" for t, top, line in _imports(path) if not top]
    assert not nested, f"{module} imports ctzarr modules inside functions: {nested}"


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for path in FILES:
        module = _module_name(path)
        graph[module] = {
            t
            for t, top, _ in _imports(path)
            if top and t != module and t in {_module_name(f) for f in FILES}
        }
    # a package __init__ importing its own submodules is not a cycle of concepts
    for module, targets in graph.items():
        graph[module] = {
            t for t in targets if not (module == "ctzarr" or t.startswith(module + "."))
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_layer_table_covers_every_module() -> None:
    for path in FILES:
        _layer(_module_name(path))
