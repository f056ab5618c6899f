"""The learning tasks: one module each, one object each, looked up by name once.

A task object says everything that differs between tasks: how targets are encoded, the loss, how raw
network outputs become predictions, the validation metrics and their direction, the evaluation, the
prediction table, the attribution score, what a prediction record holds and which metrics a model card
shows. The training loop, the study and inference call these methods and never compare task names.

Adding a task means adding a module here with a subclass of :class:`~.base.Task` and its line in
:data:`TASK_MODULES`. Importing this package imports neither torch nor the task modules.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Task

#: Task name -> module that defines it (the module's ``TASK`` object).
TASK_MODULES = {
    "classification": "classification",
    "regression": "regression",
    "segmentation": "segmentation",
}
TASK_NAMES = tuple(TASK_MODULES)
#: Each task's validation metrics -> whether larger is better (the parser reads it without importing torch).
METRIC_DIRECTIONS: dict[str, dict[str, bool]] = {
    "classification": {"loss": False, "balanced_accuracy": True, "roc_auc": True},
    "regression": {"loss": False, "mae": False},
    "segmentation": {"loss": False, "dice": True},
}
#: The values a validation metric can take (a curve fitted to its trajectory must plateau inside them).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "loss": (0.0, math.inf), "mae": (0.0, math.inf), "balanced_accuracy": (0.0, 1.0), "roc_auc": (0.0, 1.0),
    "dice": (0.0, 1.0),
}  # fmt: skip
#: The default voxel size (mm) of a segmentation's grid (the others' is the participant level's, 2 mm).
SEGMENTATION_RESOLUTION_MM = 1.5
#: Learning settings whose default depends on the task (used when the option is not given; the rest are
#: :class:`~pipeline.config.RunConfig`'s). Segmentation: AdamW at 3e-3 learned the sample's structures
#: fastest of 1e-3/3e-3/1e-2 in 300 steps; batches of two 3D patches, as nnU-Net's 3D configuration.
TASK_DEFAULTS: dict[str, dict[str, object]] = {
    "segmentation": {"architecture": "unet", "lr": 3e-3, "batch_size": 2},
}
SELECTION_METRICS = tuple(dict.fromkeys(m for d in METRIC_DIRECTIONS.values() for m in d))


def get_task(name: str) -> Task:
    """The task object of ``name`` (``classification`` ...)."""
    if name not in TASK_MODULES:
        from ...errors import UsageError

        raise UsageError(f"Unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}.")
    return importlib.import_module(f"{__name__}.{TASK_MODULES[name]}").TASK
