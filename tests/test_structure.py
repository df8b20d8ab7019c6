"""The package's shape: no import cycle among seqpatch modules, no module over 600 lines.

Which imports count: every ``import``/``from ... import`` in a module's source, at module level
or inside a function (a lazy import still is a dependency: it only moves the failure to run
time), except those under ``if TYPE_CHECKING:`` (never executed). Importing ``a.b.c`` also
imports the packages ``a.b`` and ``a`` (their ``__init__``), so those count too — except a
package the importing module lives in, which Python has already imported before the module
runs; ``from a.b import x`` counts ``a.b`` itself only when ``x`` is not a submodule of it.
Imports by name at run time (``importlib.import_module``, as the stage registry loads a stage
module) are not statements and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import seqpatch

PACKAGE = Path(seqpatch.__file__).parent
MAX_LINES = 600


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names one import statement loads (targets, not yet resolved to modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules it imports}`` among the modules under ``root`` (see module docstring)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _imported(name, path, node)
            if isinstance(node, ast.ImportFrom):
                submodules = [t for t in targets[1:] if t in modules]
                names_from_package = len(submodules) < len(targets) - 1
                targets = submodules + ([targets[0]] if names_from_package else [])
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target:
                    continue
                parts = target.split(".")
                loaded = [target] + [
                    ".".join(parts[:i])
                    for i in range(1, len(parts))
                    if not (name + ".").startswith(".".join(parts[:i]) + ".")
                ]
                graph[name].update(m for m in loaded if m != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path ``a -> b -> ... -> a``) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(graph, group) for group in groups]


def _cycle_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, within the group, back to start
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group has one


def test_no_import_cycle_among_seqpatch_modules() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_lazy_package_and_relative_imports(tmp_path: Path) -> None:
    """The checker can fail: a cycle through a function-level import, through a package's
    ``__init__`` and through a relative import is found; a TYPE_CHECKING import is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub.b import g\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from ..c import h\ng = 1\n")
    (pkg / "c.py").write_text("import pkg.a\nh = 1\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import x\n"
    )
    (pkg / "e.py").write_text("from pkg.d import y\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b", "pkg.sub"}
    assert "pkg.sub" not in graph["pkg.sub.b"]  # its own package is loaded before it
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_no_module_over_600_lines() -> None:
    sizes = {
        str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines())
        for path in _modules(PACKAGE).values()
    }
    over = {path: n for path, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by responsibility): {over}"
