"""The package's imports go one way, and packages keep their private modules to themselves.

Design notes
------------
* The graph is built from the source with ``ast``, not by importing: every ``import``
  and ``from ... import`` statement anywhere in a module counts (inside functions and
  ``if TYPE_CHECKING:`` blocks too), because a cycle hidden in a function or behind
  ``TYPE_CHECKING`` is still two modules that each need the other to be understood.
* An import of ``fsagent.a.b`` also runs ``fsagent/a/__init__.py`` first, so it counts as
  an edge to ``fsagent.a`` too, except for the importer's own packages (Python is
  already running those when it gets there). ``from P import name`` is an edge to the
  module ``P.name`` when that file exists, else to ``P``.
* A private module is one whose name starts with ``_`` (``__init__``/``__main__``
  aside); it belongs to the package it sits in, and only modules inside that package
  may import it (``fsagent.jobs._engine`` from ``fsagent.jobs._nodes``: fine; from
  ``fsagent.agent``: a violation). Other packages use what the package exports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fsagent"


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (a package is its ``__init__``)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _absolute(importer: str, level: int, module: str | None, modules) -> str:
    """Resolve ``from <level dots><module>`` as written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not _is_package(importer, modules):
        base.pop()  # a module's relative imports start from its package
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([module] if module else []))


def _targets(importer: str, tree: ast.AST, modules) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of the package's own modules."""
    found: list[tuple[str, int]] = []

    def add(name: str, line: int) -> None:
        # The longest prefix that is one of our modules ("fsagent.rpc.Client" -> fsagent.rpc).
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            found.append((".".join(parts), line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(importer, node.level, node.module, modules)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno)
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph(root: Path = ROOT):
    """``(edges, where)``: module -> imported modules, and (importer, imported) -> line."""
    modules = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    where: dict[tuple[str, str], int] = {}
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, line in _targets(importer, tree, modules):
            parts = target.split(".")
            # The target and the packages Python runs on the way to it.
            for n in range(1, len(parts) + 1):
                step = ".".join(parts[:n])
                if step == importer or (n < len(parts) and _within(importer, step)):
                    continue
                edges[importer].add(step)
                where.setdefault((importer, step), line)
    return edges, where


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles as closed paths: per strongly connected component, a shortest cycle through
    each of its modules (the same cycle found from two of its modules is listed once)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the package is small, recursion is fine
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in edges[v]:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)

    cycles: list[list[str]] = []
    seen: set[frozenset] = set()
    for component in components:
        for start in component:
            cycle = _shortest_cycle(edges, set(component), start)
            hops = frozenset(zip(cycle, cycle[1:]))
            if hops not in seen:
                seen.add(hops)
                cycles.append(cycle)
    return cycles


def _shortest_cycle(edges: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest closed path from ``start`` through ``members`` back to it (breadth-first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [start]
                    while v != start:
                        path.append(v)
                        v = previous[v]
                    return [start] + path[:0:-1] + [start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def private_imports(edges, where) -> list[str]:
    """Imports of a package's private (``_x``) module from outside that package."""
    out = []
    for importer in sorted(edges):
        for target in sorted(edges[importer]):
            parts = target.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if not _within(importer, owner):
                        out.append(f"{importer} (line {where[(importer, target)]}) imports "
                                   f"{target}, private to {owner}")
                    break
    return out


def test_graph_sees_relative_absolute_and_function_level_imports():
    # The checks below are only as good as the graph: it must see the forms the code uses.
    edges, where = import_graph()
    assert "fsagent.jobs._engine" in edges["fsagent.jobs._component"]  # from ._engine import
    assert "fsagent.jobs._states" in edges["fsagent.jobs._engine"]  # sibling, relative
    assert "fsagent.config" in edges["fsagent.cli"]                 # from .config import
    assert "fsagent.agent" in edges["fsagent.cli"]                  # inside cmd_run()
    assert "fsagent.cli" in edges["fsagent.__main__"]               # absolute
    assert "fsagent.component" in edges["fsagent.uploads._component"]  # two dots
    assert "fsagent.jobs" not in edges["fsagent.jobs._engine"]      # own package: not an edge


def test_cycle_finder_and_private_rule_catch_what_they_should():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"]]
    edges = {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}
    assert find_cycles(edges) == [["a", "b", "a"], ["c", "a", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    edges = {"p.x": {"q._y", "p._z"}, "q._y": set(), "p._z": set(), "q": {"q._y"}}
    where = {("p.x", "q._y"): 3, ("p.x", "p._z"): 4, ("q", "q._y"): 1}
    assert private_imports(edges, where) == ["p.x (line 3) imports q._y, private to q"]


def test_no_import_cycle_in_the_package():
    edges, where = import_graph()
    cycles = find_cycles(edges)
    report = []
    for path in cycles:
        hops = [f"{a} -> {b} (line {where[(a, b)]})" for a, b in zip(path, path[1:])]
        report.append("cycle: " + " -> ".join(path) + "\n    " + "\n    ".join(hops))
    assert not cycles, "import cycles in fsagent/:\n" + "\n".join(report)


def test_no_package_imports_another_packages_private_module():
    edges, where = import_graph()
    violations = private_imports(edges, where)
    assert not violations, ("private modules imported from outside their package:\n"
                            + "\n".join(violations))
