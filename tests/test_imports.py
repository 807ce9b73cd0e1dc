"""No import cycles in the package (read with `ast`, nothing imported).

Every import of another llmserve module counts: module level and inside functions (a lazy
import still forms a cycle, it only moves the failure to run time), but not those under
`if TYPE_CHECKING:` (never run). Relative imports are resolved; `from pkg import name` is an
edge to `pkg.name` when that is a module, else to `pkg` itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llmserve"

Graph = dict[str, set[str]]


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under root: dotted name -> file."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under node, at any depth, skipping `if TYPE_CHECKING:` bodies
    (their `else:` still runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                if isinstance(stmt, ast.Import | ast.ImportFrom):
                    yield stmt
                yield from _imports(stmt)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _imports(child)


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module a dotted name starts with."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path, package: str) -> Graph:
    """module -> the package's modules it imports."""
    known = modules(root, package)
    graph: Graph = {name: set() for name in known}
    for name, path in known.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for stmt in _imports(tree):
            targets: list[str] = []
            if isinstance(stmt, ast.Import):
                targets = [alias.name for alias in stmt.names]
            else:
                base = stmt.module or ""
                if stmt.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (stmt.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in stmt.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else base)
            for target in targets:
                if target == package or target.startswith(package + "."):
                    owner = _owner(target, known)
                    if owner is not None and owner != name:
                        graph[name].add(owner)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(graph: Graph, component: list[str]) -> str:
    """A cycle's modules and the edges between them."""
    members = set(component)
    edges = [f"    {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return " <-> ".join(component) + "\n" + "\n".join(edges)


def test_no_import_cycles() -> None:
    graph = import_graph(ROOT, PACKAGE)
    assert len(graph) > 50  # NOTE: the walk found the package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, c) for c in found)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_finds_cycles_in_a_synthetic_package(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import thing\n",
        # a lazy import inside a function still counts
        "pkg/b.py": "def f():\n    from pkg import a\n    return a\nthing = 1\n",
        # relative imports, and a submodule named in `from package import name`
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from . import d\n",
        "pkg/sub/d.py": "from ..sub.e import x\n",
        "pkg/sub/e.py": "import pkg.sub.c\nx = 1\n",
        # TYPE_CHECKING imports never run: no cycle
        "pkg/f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import g\n",
        "pkg/g.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    import pkg.h\n",
        "pkg/h.py": "from pkg.g import *\n",
        "pkg/i.py": "from pkg.f import name\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.sub.d"}
    assert graph["pkg.f"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.g", "pkg.h"],
                             ["pkg.sub.c", "pkg.sub.d", "pkg.sub.e"]]


def test_a_clean_synthetic_package_passes(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import x\n",
        "pkg/a.py": "x = 1\n",
        "pkg/b.py": "from pkg import a\nfrom .a import x\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": set(), "pkg.b": {"pkg.a"}}
    assert cycles(graph) == []
