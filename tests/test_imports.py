"""The package's modules import each other in one direction (no cycles), function-level
imports included."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "metatransfer"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(f): f for f in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + [node.module] if node.module else base)
                if not node.level:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return False


def test_no_import_cycles_below_the_package_root():
    # the root only re-exports FewShotClassifier lazily; every other module must not
    # import one that imports it back
    graph = {name: targets - {"metatransfer"} for name, targets in import_graph().items()}
    cycles = [(a, b) for a in graph for b in graph[a] if reaches(graph, b, a)]
    assert not cycles


def test_layers_point_one_way():
    graph = import_graph()
    assert graph["metatransfer.distributed"] <= {"metatransfer.devices", "metatransfer.errors"}
    assert "metatransfer.training" not in set().union(*(graph[m] for m in (
        "metatransfer.runs", "metatransfer.distributed", "metatransfer.devices")))
