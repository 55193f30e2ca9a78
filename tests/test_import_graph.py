"""No import cycles in the package: the import graph of every module, read from the source, has no
strongly connected component of more than one module.

Imports count at any depth (module level, inside functions, under ``if TYPE_CHECKING:``): a
function-level import back into a module that imports you still ties the two together (neither can
be understood, tested or moved without the other), it only hides the cycle from the import system
until the function runs. Strings handed to importlib (the registry's ``Lazy("edgeprep.x:f")``) are
not imports and are not counted.

The package's folders come from pyproject's ``[tool.setuptools.package-dir]`` (``edgeprep.exporters``
lives in ``exporters/``), so a newly mapped folder is checked without touching this test.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]

Graph = dict[str, dict[str, str]]  # module -> {imported module: "file:line" of the import that made the edge}


def package_roots(pyproject: Path) -> dict[str, Path]:
    """{package name: its folder} from ``[tool.setuptools.package-dir]``."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the graph does not depend on the version
    mapping = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-dir"]
    return {pkg: pyproject.parent / folder for pkg, folder in mapping.items()}


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: source file} for every ``.py`` under each root. A file under one root that
    falls inside another, more specific mapped package (say ``edgeprep/exporters/x.py`` while
    ``edgeprep.exporters`` maps to ``exporters/``) is not part of the installed package: skipped."""
    modules: dict[str, Path] = {}
    for pkg, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if any(other != pkg and other.startswith(pkg + ".") and (name == other or name.startswith(other + "."))
                   for other in roots):
                continue
            modules[name] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> Optional[str]:
    """The absolute module a ``from X import ...`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    if not package:
        return None  # a relative import above the top-level package: not ours
    return f"{package}.{node.module}" if node.module else package


def build_graph(modules: dict[str, Path]) -> Graph:
    """Each module's imports of other modules in ``modules``.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b`` (``c`` is a
    name defined there). Importing ``a.b.c`` also imports its parent packages ``a`` and ``a.b``: those
    edges are added, except to the importing module's own ancestors, which the import system loads
    before the module whatever it imports (counting them would make every package whose ``__init__``
    imports a submodule a cycle). An explicit ``from a import name`` in a submodule of ``a`` is kept:
    that one does need ``a``'s ``__init__`` to have run, and is the cycle to catch.
    """
    graph: Graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        own_ancestors = set(_ancestors(name))
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        deps: dict[str, str] = {}

        def add(target: str, line: int) -> None:
            if target in modules and target != name:
                deps.setdefault(target, f"{shown}:{line}")
            for parent in _ancestors(target):  # implicit: never to the module's own ancestors
                if parent in modules and parent != name and parent not in own_ancestors:
                    deps.setdefault(parent, f"{shown}:{line}")

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(node, name, is_package)
                if base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else base, node.lineno)
        graph[name] = deps
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative:
    a deep import chain must not hit the recursion limit), each sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next((c for c in children if c not in index or c in on_stack), None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                else:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return sorted(found)


def describe_cycle(graph: Graph, component: list[str]) -> str:
    """One concrete loop through the component, each edge with the import that makes it:
    ``a -> b (a.py:3) -> a (b.py:12)`` (shortest path back to the first module, breadth first)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier, seen = [start], {start}
    while frontier and start not in previous:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w in members and w not in previous and (w == start or w not in seen):
                    previous[w] = v
                    seen.add(w)
                    following.append(w)
        frontier = following
    path = [start]
    while len(path) == 1 or path[-1] != start:
        path.append(previous[path[-1]])
    path.reverse()  # built backwards from start's predecessor
    hops = [f"{b} ({graph[a][b]})" for a, b in zip(path, path[1:])]
    return f"{len(component)} modules {component}: " + " -> ".join([start, *hops])


# ----------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def package_graph() -> Graph:
    return build_graph(module_files(package_roots(REPO / "pyproject.toml")))


def test_package_has_no_import_cycles(package_graph):
    found = cycles(package_graph)
    assert not found, "import cycles (break each by moving what both sides need into a lower module):\n" + \
        "\n".join(describe_cycle(package_graph, c) for c in found)


def test_the_graph_really_is_the_package(package_graph):
    # Guards against a vacuous pass: no files found, or imports not parsed.
    assert len(package_graph) > 100
    assert "edgeprep.recipe" in package_graph["edgeprep.pipeline"]
    assert "edgeprep.exporters.base" in package_graph["edgeprep.exporters.onnx"]  # the mapped folder
    assert "edgeprep.report_prune" in package_graph["edgeprep.report"]  # a function-level import
    assert not any(name.startswith("edgeprep.edgeprep") for name in package_graph)


# ----------------------------------------------------------------------------- the graph functions
def write_modules(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, source in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(source)
    return module_files({"fake": tmp_path / "fake", "fake.ext": tmp_path / "ext"})


def test_a_function_level_import_back_is_a_cycle(tmp_path):
    graph = build_graph(write_modules(tmp_path, {
        "fake/__init__.py": "",
        "fake/a.py": "from fake.b import helper\n",
        "fake/b.py": "def helper():\n    from fake import a\n    return a\n",
        "fake/c.py": "import fake.a\n",  # imports into the cycle, is not part of it
    }))
    assert cycles(graph) == [["fake.a", "fake.b"]]
    message = describe_cycle(graph, ["fake.a", "fake.b"])
    assert message.startswith("2 modules ['fake.a', 'fake.b']: fake.a -> fake.b (")
    assert message.endswith("a.py:1) -> fake.a (" + str(tmp_path / "fake" / "b.py") + ":2)")


def test_relative_imports_and_mapped_folders_are_resolved(tmp_path):
    graph = build_graph(write_modules(tmp_path, {
        "fake/__init__.py": "",
        "fake/sub/__init__.py": "from . import x\n",
        "fake/sub/x.py": "from ..y import thing\n",
        "fake/y.py": "from fake.ext.m import thing\n",
        "ext/__init__.py": "",
        "ext/m.py": "from fake.sub import x\n",
        "fake/ext/ignored.py": "import fake.y\n",  # shadowed by the mapped folder: not in the package
    }))
    assert "fake.ext.ignored" not in graph
    assert graph["fake.sub"].keys() == {"fake.sub.x"}
    assert "fake.y" in graph["fake.sub.x"]
    assert graph["fake.ext.m"].keys() == {"fake.sub.x", "fake.sub"}  # the package is imported on the way
    # fake.sub is in the cycle too: importing fake.sub.x runs fake/sub/__init__.py, which imports x
    assert cycles(graph) == [["fake.ext.m", "fake.sub", "fake.sub.x", "fake.y"]]


def test_a_package_importing_its_submodules_is_no_cycle_but_importing_back_from_it_is(tmp_path):
    files = {
        "fake/__init__.py": "from fake.zoo import ZOO\n\ndef load():\n    from fake.loaders import load\n",
        "fake/zoo.py": "ZOO = {}\n",
        "fake/loaders.py": "from fake.zoo import ZOO\n",
    }
    assert cycles(build_graph(write_modules(tmp_path, files))) == []
    files["fake/loaders.py"] = "from fake import ZOO\n"  # the name from the package's __init__
    assert cycles(build_graph(write_modules(tmp_path, files))) == [["fake", "fake.loaders"]]
