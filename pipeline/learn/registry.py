"""The task registry: every task's name and object, resolved once at the entry points.

A task object (:class:`~pipeline.learn.task.Task`) says everything that differs between tasks: how targets are
encoded, the loss, how raw network outputs become predictions, its metrics (direction and range), its defaults and
architectures, the evaluation, the prediction table, the attribution score, what a prediction record holds and
which metrics a model card shows. The training loop, the study, inference and the reports call these methods and
never compare task names.

The tasks are the modules of :mod:`pipeline.learn.tasks` (each one's ``TASK``), found without importing them:
importing the registry imports neither torch nor a task module, and nothing below the tasks imports them. A task
defined elsewhere (a plug-in, a test) is added with :func:`register_task`.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import TYPE_CHECKING

import pandas as pd

from ..errors import UsageError

if TYPE_CHECKING:
    from .task import Task

#: Where the tasks are: one module (or package) per task.
TASKS_PACKAGE = "pipeline.learn.tasks"
#: Modules of the tasks' package that are not tasks (what several tasks share).
_SHARED_MODULES = frozenset({"image"})
_LOCATIONS = importlib.util.find_spec(TASKS_PACKAGE).submodule_search_locations  # type: ignore[union-attr]
#: The tasks, by name (= module name), in name order.
TASK_NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(_LOCATIONS) if m.name not in _SHARED_MODULES))
#: Tasks added by :func:`register_task`.
_REGISTERED: dict[str, Task] = {}
#: What ``--task auto`` chooses between: classes for categorical targets, values for numeric ones.
AUTO_CATEGORICAL, AUTO_NUMERIC = "classification", "regression"
#: Numeric targets with fewer distinct values than this are taken as classes under ``--task auto``.
MIN_REGRESSION_VALUES = 5


def task_names() -> tuple[str, ...]:
    """Every task's name: this package's and the registered ones."""
    return tuple(dict.fromkeys((*TASK_NAMES, *sorted(_REGISTERED))))


def get_task(name: str) -> Task:
    """The task object of ``name`` (``classification`` ...)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in TASK_NAMES:
        raise UsageError(f"Unknown task {name!r}: choose one of {', '.join(task_names())}.")
    return importlib.import_module(f"{TASKS_PACKAGE}.{name}").TASK


def register_task(task: Task) -> Task:
    """Add a task defined outside this package (its ``name`` must be new); returns it."""
    if task.name in TASK_NAMES or task.name in ("", "auto"):
        raise UsageError(f"A task named {task.name!r} exists already: give the new task another name.")
    _REGISTERED[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Remove a task added by :func:`register_task` (a test's, when it ends)."""
    _REGISTERED.pop(name, None)


def auto_task_names() -> tuple[str, str]:
    """The tasks ``--task auto`` may choose."""
    return (AUTO_CATEGORICAL, AUTO_NUMERIC)


def resolve_task_name(values: pd.Series, task: str) -> str:
    """``task``, or for ``auto`` the one the target's values call for: numbers with at least
    :data:`MIN_REGRESSION_VALUES` distinct values are regressed, anything else is classified.

    >>> resolve_task_name(pd.Series(["AD", "CN"]), "auto"), resolve_task_name(pd.Series([1.0, 2, 3, 4, 5]), "auto")
    ('classification', 'regression')
    """
    if task != "auto":
        return task
    numeric = pd.to_numeric(values.dropna(), errors="coerce")
    if numeric.notna().all() and numeric.nunique() >= MIN_REGRESSION_VALUES:
        return AUTO_NUMERIC
    return AUTO_CATEGORICAL
