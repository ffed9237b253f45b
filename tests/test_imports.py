"""The package's modules import each other in one direction (no cycles), function-level
and dynamic imports (``importlib.import_module``, ``__import__``) included."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "metatransfer"
DYNAMIC = ("import_module", "__import__")


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dynamic_target(node: ast.Call, package: str) -> str | None:
    """The module an ``import_module(...)`` / ``__import__(...)`` call loads: its name as
    written, ``"?"`` when it builds a name in ``package`` (``f"{package}.{x}"``: the graph
    cannot follow it), None otherwise (a variable: a third-party module by name)."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in DYNAMIC or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        head = arg.values[0] if arg.values else None
    elif isinstance(arg, ast.BinOp):
        head = arg.left
    else:
        return None
    if isinstance(head, ast.Constant) and str(head.value).startswith((package, ".")):
        return "?"
    return None


def import_graph(root: Path = SRC) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package modules it imports; and the dynamic imports it cannot follow."""
    modules = {module_name(f, root): f for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    unfollowed = []
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
            elif isinstance(node, ast.Call) and (target := dynamic_target(node, root.name)):
                if target == "?":
                    unfollowed.append(f"{name}:{node.lineno}")
                targets = [target]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph, unfollowed


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


def cycles(graph: dict[str, set[str]], root: str) -> list[tuple[str, str]]:
    # the root only re-exports FewShotClassifier lazily; every other module must not
    # import one that imports it back
    graph = {name: targets - {root} for name, targets in graph.items()}
    return [(a, b) for a in graph for b in graph[a] if reaches(graph, b, a)]


def test_no_import_cycles_below_the_package_root():
    graph, unfollowed = import_graph()
    assert not unfollowed, "dynamic imports of computed names: import the module by name"
    assert not cycles(graph, "metatransfer")


def test_the_graph_follows_dynamic_imports(tmp_path):
    """A cycle closed by ``__import__`` / ``import_module`` (the old cli -> serve ->
    cli.add_model_options loop) is found, and a computed module name is reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def build():\n    return __import__('pkg.serve')\n")
    (pkg / "serve.py").write_text("def register():\n    from .cli import build\n")
    (pkg / "report.py").write_text(
        "import importlib\n\ndef load(name):\n    return importlib.import_module(f'pkg.{name}')\n"
        "\ndef optional(name):\n    return importlib.import_module(name)\n")
    graph, unfollowed = import_graph(pkg)
    assert graph["pkg.cli"] == {"pkg.serve"}
    assert ("pkg.cli", "pkg.serve") in cycles(graph, "pkg")
    assert unfollowed == ["pkg.report:4"]


def test_layers_point_one_way():
    graph, _ = import_graph()
    assert graph["metatransfer.distributed"] <= {"metatransfer.devices", "metatransfer.errors"}
    assert "metatransfer.training" not in set().union(*(graph[m] for m in (
        "metatransfer.runs", "metatransfer.distributed", "metatransfer.devices")))


def test_tools_load_and_print_without_the_phases():
    """``mtl adapt`` and ``mtl serve`` load models through the loader and the CLI prints
    through the results module: none of them imports a phase for that, and serve does
    not import the CLI (the CLI only imports the phases it runs)."""
    graph, _ = import_graph()
    phases = {m for m in graph if m.startswith("metatransfer.phases")}
    for tool in ("metatransfer.adapt", "metatransfer.serve", "metatransfer.loader",
                 "metatransfer.results", "metatransfer.methods.catalog"):
        assert not any(reaches(graph, t, p) for t in graph[tool] for p in phases), tool
    assert not reaches(graph, "metatransfer.serve", "metatransfer.cli")
    ran = {"metatransfer.phases.pretrain", "metatransfer.phases.meta_train",
           "metatransfer.phases.meta_test"}
    assert graph["metatransfer.cli"] & phases == ran
