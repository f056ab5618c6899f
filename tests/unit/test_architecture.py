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
    return _floor_in(module, FLOORS)


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


#: The layers inside learn/, top to bottom: a module may import from its own layer and the ones below, never above.
#: Libraries know no Task; the Task interface and its registry stand on them; the machinery that every task shares
#: takes a Task as an argument; the tasks implement it with that machinery; the study runs them all.
LEARN_LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.learn.study",),
    ("pipeline.learn.tasks",),
    tuple(f"pipeline.learn.{m}" for m in ("cohort", "splits", "leakage", "controls", "curve", "train", "ensemble",
                                          "package", "transfer", "infer", "external", "export")),
    ("pipeline.learn.task", "pipeline.learn.registry"),
    tuple(f"pipeline.learn.{m}" for m in ("data", "models", "evaluate", "channels", "labels", "ood", "baseline",
                                          "near_duplicates", "distributed", "walltime", "memory", "volumes",
                                          "search", "device")),
    ("pipeline.learn",),
)
MAX_LINES = 600
MAX_PARAMETERS = 10


def _layer(module: str) -> int:
    return _floor_in(module, LEARN_LAYERS)


def _floor_in(module: str, floors: tuple[tuple[str, ...], ...]) -> int:
    best = (-1, len(floors))
    for level, prefixes in enumerate(floors):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), level)
    return best[1]


def _learn_modules() -> dict[str, Path]:
    return {m: p for m, p in _modules().items() if m == "pipeline.learn" or m.startswith("pipeline.learn.")}


def test_learn_is_in_layers():
    learn = _learn_modules()
    upward = [f"{a} -> {b}" for a, b in import_graph().edges if a in learn and b in learn and _layer(b) < _layer(a)]
    assert upward == [], "imports inside learn/ that run up a layer: " + "; ".join(upward)


def test_every_learn_module_has_a_layer():
    assert [m for m in _learn_modules() if _layer(m) == len(LEARN_LAYERS)] == []


def test_the_layer_test_catches_an_upward_import():
    """A library that imported a task (the mutation the layers forbid) would be caught."""
    assert _layer("pipeline.learn.tasks.classification") < _layer("pipeline.learn.ensemble") < _layer(
        "pipeline.learn.task") < _layer("pipeline.learn.ood")  # fmt: skip


def test_learn_modules_stay_readable():
    long = [f"{p.relative_to(ROOT)} ({n})" for p in _learn_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]  # fmt: skip
    assert long == [], f"modules of learn/ over {MAX_LINES} lines: {long}"


def test_learn_functions_take_few_parameters():
    many = []
    for path in _learn_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                n = len([a for a in names if a not in ("self", "cls")])
                if n > MAX_PARAMETERS:
                    many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert many == [], f"functions of learn/ with over {MAX_PARAMETERS} parameters: {many}"


def test_the_task_interface_has_no_method_of_one_task():
    """Every method of the Task interface is one more than one task implements, or one every task family implements
    (no body): a method that only one task replaces belongs to that task (or its family), not to the interface."""
    import inspect

    from pipeline.learn.registry import get_task, task_names
    from pipeline.learn.task import Task

    tasks = {name: type(get_task(name)) for name in task_names()}
    for name, method in vars(Task).items():
        if name.startswith("_") or not inspect.isfunction(method):
            continue
        implementers = [task for task, cls in tasks.items() if getattr(cls, name) is not method]
        assert len(implementers) != 1, f"Task.{name} is implemented by {implementers[0]} alone"
        if "raise NotImplementedError" in inspect.getsource(method):
            assert len(implementers) >= 2, f"Task.{name} has no default and {len(implementers)} implementation"
