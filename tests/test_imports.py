"""The package's imports flow one way: no module imports, even lazily, a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"cmgnet": REPO / "cmgnet", "cmgnet.deploy": REPO / "deploy"}  # pyproject's package-dir mapping


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def _under_type_checking(node: ast.AST, parents: list[ast.AST]) -> bool:
    return any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test) for p in parents)


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules ``module`` imports anywhere in its body (inside functions too), not for typing only."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    stack: list[tuple[ast.AST, list[ast.AST]]] = [(ast.parse(path.read_text()), [])]
    while stack:
        node, parents = stack.pop()
        for child in ast.iter_child_nodes(node):
            stack.append((child, [*parents, node]))
            if not isinstance(child, (ast.Import, ast.ImportFrom)) or _under_type_checking(child, [*parents, node]):
                continue
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            else:
                base = module.split(".") if is_package else module.split(".")[:-1]
                if child.level:
                    base = base[: len(base) - child.level + 1]
                    prefix = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    prefix = child.module or ""
                names = [f"{prefix}.{alias.name}" for alias in child.names]
            for name in names:
                while name and name not in known:  # `from pkg import function` -> pkg
                    name = name.rpartition(".")[0]
                # Python imports a module's packages before the module: importing one is no cycle.
                if name and name != module and not module.startswith(name + "."):
                    targets.add(name)
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_inside_the_package():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert len(known) > 80 and "cmgnet.deploy.runtime" in known
    assert {"cmgnet.train.engine", "cmgnet.train.config"} <= graph["cmgnet.train.cli"]  # lazy imports count
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
