"""The import graph of emdpo_plugin and data_builders, read with ast (nothing is imported).

No module may import itself round a cycle, not even through an import inside a function: such
a cycle only works while every import stays lazy, and hides which layer depends on which.
`emdpo_plugin.algorithms` (the paper's math) must not import the rest of the package, so it can
be read, tested and reused on its own. `emdpo_plugin.host` (OpenRLHF and DeepSpeed adapted) sits
below everything that uses the host: it imports nothing else from the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emdpo_plugin", "data_builders")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    """Every import statement at any depth, except under `if TYPE_CHECKING:` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _is_type_checking(child))


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        """The module `name` lives in (`a.b.func` -> `a.b`), or None outside these packages."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [resolve(alias.name) for alias in node.names]
            else:
                if node.level:  # relative: `.` is the package, each further dot one level up
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names]
            deps.update(t for t in targets if t and t != name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
    return found


def test_the_graph_sees_the_imports() -> None:
    graph = _graph()
    assert len(graph) > 50
    assert "emdpo_plugin.executors" in graph["emdpo_plugin.recipe.runner"]  # from ..executors import ...
    assert "data_builders.labellers" in graph["data_builders.imdb_synthetic.builder"]  # from ..labellers import ...
    assert "emdpo_plugin.data.manifest" in graph["emdpo_plugin.data.io"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def _imports_from_outside(graph: dict[str, set[str]], room: str) -> dict[str, list[str]]:
    """Each module of `room` -> what it imports from the rest of emdpo_plugin."""
    return {
        name: sorted(d for d in deps if d.startswith("emdpo_plugin") and not d.startswith(room))
        for name, deps in graph.items()
        if name.startswith(room)
    }


def test_algorithms_import_nothing_else_from_the_package() -> None:
    outside = _imports_from_outside(_graph(), "emdpo_plugin.algorithms")
    assert any(name == "emdpo_plugin.algorithms.em" for name in outside)
    assert not {k: v for k, v in outside.items() if v}, outside


def test_the_host_room_imports_nothing_else_from_the_package() -> None:
    graph = _graph()
    outside = _imports_from_outside(graph, "emdpo_plugin.host")
    assert {"emdpo_plugin.host.compat", "emdpo_plugin.host.args", "emdpo_plugin.host.tiny_sft"} <= set(outside)
    assert not {k: v for k, v in outside.items() if v}, outside
    # its users reach the host through it
    assert "emdpo_plugin.host.compat" in graph["emdpo_plugin.backends.openrlhf_backend"]
    assert "emdpo_plugin.host.tiny_sft" in graph["emdpo_plugin.models.tiny"]
