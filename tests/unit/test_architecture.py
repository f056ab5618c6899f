"""The house, read from the code: the import graph has no cycle and no arrow up a floor, task names are compared
only inside learn/tasks, and functions stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"

#: The floors, top to bottom: a module may import from its own floor and the ones below it, never above.
#: cli dispatches to the entry points (participant, group, learn.export); they run workflows, learning, reports.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("pipeline.cli",),
    ("pipeline.participant", "pipeline.group", "pipeline.plan"),
    ("pipeline.workflows", "pipeline.interfaces"),
    ("pipeline.learn", "pipeline.sample"),
    ("pipeline.reports",),
    ("pipeline.qc", "pipeline.ops", "pipeline.processes"),
    ("pipeline.bids",),
    ("pipeline.derivatives", "pipeline.config", "pipeline.progress", "pipeline.environment"),
    ("pipeline.kinds", "pipeline.errors", "pipeline"),
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> nx.DiGraph:
    """Module -> the pipeline modules it imports, at module level or inside functions alike."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return graph


def _floor(module: str) -> int:
    best = (-1, len(FLOORS))
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), level)
    return best[1]


def test_the_import_graph_has_no_cycle():
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == [], f"import cycles: {cycles}"


def test_no_import_runs_up_a_floor():
    upward = [f"{a} -> {b}" for a, b in import_graph().edges if _floor(b) < _floor(a)]
    assert upward == [], "imports that run up a floor: " + "; ".join(upward)


def test_every_module_has_a_floor():
    assert [m for m in _modules() if _floor(m) == len(FLOORS)] == []


def test_task_names_are_compared_only_inside_the_tasks():
    from pipeline.learn.registry import task_names

    names = set(task_names())
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "learn/tasks" in path.as_posix():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                found += [f"{path.relative_to(ROOT)}:{node.lineno}" for c in constants if c.value in names]
    assert found == [], f"literal task names compared: {found}"


def test_functions_stay_short():
    lengths = sorted(
        ((node.end_lineno or node.lineno) - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    )[::-1]
    assert lengths[0][0] <= 100, f"longest function: {lengths[0]}"
    over_60 = [where for n, where in lengths if n > 60]
    assert len(over_60) <= 6, f"{len(over_60)} functions over 60 lines: {over_60}"
