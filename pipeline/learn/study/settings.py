"""A study's settings and the records its stages hand on (the cohort, the splits, a fold's result); where a study's
folds live and when a fold's earlier run can be kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ... import derivatives
from ...errors import UsageError
from ...kinds import DEFAULT_CHANNELS
from .. import transfer, walltime
from ..splits import (
    EVERYONE,
    SplitSettings,
    fold_members,
)
from ..task import Task
from ..train import (
    TargetScale,
    TrainSettings,
)


@dataclass(frozen=True)
class StudySettings:
    """What to learn and how (plain values, made from the run config by the group level)."""

    target: str
    task: str
    positive_class: str | None
    exclude_qc_outliers: bool
    include_failed_qc: bool
    stratify: tuple[str, ...]
    split: SplitSettings
    architecture: str
    train: TrainSettings
    model_resolution: float
    bids_dir: Path
    output_dir: Path
    labels: Path | None
    label_desc: str | None
    patch_size: int
    device: str
    resume: bool
    resplit: bool
    tensorboard: bool
    learning_settings: dict[str, Any]
    fold: tuple[int, ...] = ()  # only these folds (fold-parallel jobs); none: every fold, then the assembly
    outer_fold: tuple[int, ...] = ()  # nested cross-validation: only these outer folds (:mod:`.nested`)
    inputs: tuple[str, ...] = DEFAULT_CHANNELS  # the image kinds fed as channels, in order
    baseline: bool = True  # a linear model beside the network (whole-image tasks)
    permutation_control: bool = False  # the study again on shuffled training targets
    init_from: Path | None = None  # transfer learning: the source model package
    freeze: bool = False  # with init_from: the encoder kept at the source's weights
    search: int = 0  # random-search trials (0: none)
    trial: tuple[int, ...] = ()  # only these trials (array jobs)
    time_limit: float | None = None  # seconds this job may run
    deadline: walltime.Deadline = walltime.NO_DEADLINE  # set by run_study from time_limit and SLURM's end
    #: A study on everyone (no test set): the evaluation its performance is expected from (the nested one's)
    expected: dict[str, Any] | None = None
    #: How the evaluation was designed (one test set or nested, chosen by whom, why): results.json and the report
    design: dict[str, Any] | None = None


#: Learning settings that change what is reported beside the folds, never a fold's training: a fold trained with
#: or without them is the same (resumed or reused either way).
BESIDE_THE_FOLDS = ("baseline", "permutation_control")


def _fold_settings(learning_settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in learning_settings.items() if k not in BESIDE_THE_FOLDS}


def _settings_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    old, new = _fold_settings(old), _fold_settings(new)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


#: Written into a fold's folder when its training has finished: what it was trained with (hashes).
FOLD_RECORD = derivatives.STUDY_OUTPUTS["fold_record"]


def prepare_run_dir(run_dir: Path, settings: StudySettings, split: SplitStage, folds: Sequence[int]) -> None:
    """Check ``--resume`` against the settings of the interrupted run, or start ``folds`` afresh.

    Folds that finished with the same settings and splits (their ``fold.json``) are kept and reused. Fold-parallel
    jobs (``--fold``) run at once: each touches its own folds only, and all write the same ``run.json``.
    """
    record_path = run_dir / "run.json"
    wanted = json.loads(json.dumps(settings.learning_settings))
    old = json.loads(record_path.read_text()).get("learning_settings", {}) if record_path.exists() else None
    if settings.resume and old is not None:
        diff = _settings_difference(old, wanted)
        if diff:
            raise UsageError(
                "--resume refused: the settings differ from those of the run in "
                f"{run_dir} ({'; '.join(diff)}). Resume with the same settings, or run without --resume to start over."
            )
        return
    stale = [run_dir / f"fold-{k}" for k in folds] if settings.fold else sorted(run_dir.glob("fold-*"))
    for fold_dir in stale:
        fold = int(fold_dir.name.removeprefix("fold-"))
        if fold_dir.exists() and not (fold in folds and fold_finished(fold_dir, fold_key(settings, split, fold))):
            shutil.rmtree(fold_dir)
    derivatives.write_json(record_path, {"learning_settings": wanted})


def fold_key(settings: StudySettings, split: SplitStage, fold: int) -> dict[str, str]:
    """What a fold's training depends on: the learning settings, and who is in its train/validation/test sets."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    return {"settings_sha256": digest(_fold_settings(settings.learning_settings)),
            "members_sha256": digest(split.members(fold))}  # fmt: skip


def fold_finished(fold_dir: Path, key: dict[str, str]) -> bool:
    """Whether ``fold_dir`` holds a finished training made with ``key`` (and its checkpoint)."""
    record_path = fold_dir / FOLD_RECORD
    if not record_path.exists() or not (fold_dir / "checkpoint.pt").exists():
        return False
    record = json.loads(record_path.read_text())
    return all(record.get(name) == value for name, value in key.items())


def selected_folds(settings: StudySettings, n_folds: int) -> list[int]:
    """The folds this run trains: ``--fold`` (checked against the splits), else all of them."""
    wrong = [k for k in settings.fold if k >= n_folds]
    if wrong:
        raise UsageError(f"--fold {wrong[0]} is out of range: the splits have folds 0 to {n_folds - 1}.")
    return list(settings.fold) or list(range(n_folds))


@dataclass(frozen=True)
class Provenance:
    """What a study's record names besides its settings: the run's configuration (``config.json``), its software
    environment, the manifest's hash, and when the study started (its wall time)."""

    config_record: dict[str, Any]
    environment: dict[str, Any]
    manifest_sha256: str
    started: float


@dataclass(frozen=True)
class CohortStage:
    """Who is learned from: the cached images (one row each), their classes, the task and what was left out."""

    images: pd.DataFrame
    classes: list[str]
    task: Task
    excluded: list[dict[str, str]]


@dataclass(frozen=True)
class SplitStage:
    """The subject-level splits, the leakage checks that passed them and the run folder."""

    splits: pd.DataFrame
    reused: bool
    checks: list[dict[str, Any]]
    near_pairs: list[dict[str, Any]]
    run_dir: Path
    source: transfer.Source | None = None  # --init-from
    seen_by_source: dict[str, str] = dataclasses.field(default_factory=dict)  # participant -> why
    moved_to_training: list[dict[str, str]] = dataclasses.field(default_factory=list)

    @property
    def n_folds(self) -> int:
        return int(self.splits["fold"].dropna().nunique())

    def members(self, fold: int) -> dict[str, list[str]]:
        return fold_members(self.splits, fold)


@dataclass(frozen=True)
class FoldResult:
    """One trained fold: its kept weights, history and evaluations, and its outputs on every split."""

    fold: int
    weights: Path
    scale: TargetScale
    threshold: float
    history: list[dict[str, Any]]
    best: dict[str, dict[str, float]]
    stopped_early: bool
    outlook: dict[str, Any] | None
    n_train: int
    n_validation: int
    validation: dict[str, Any]
    test: dict[str, Any]
    predictions: list[pd.DataFrame]
    validation_output: np.ndarray
    test_output: np.ndarray
    transfer: dict[str, Any] | None = None  # --init-from: the source fold, what was loaded, frozen, drawn anew
    #: The fold's training features described, and its validation images' and training images' (left out one at a
    #: time) scores against them (:mod:`pipeline.learn.ood`); None with fewer than 3 training images.
    distribution: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """What ``results.json`` keeps of the fold."""
        return {
            "fold": self.fold, "threshold": self.threshold, "history": self.history, "best": self.best,
            "stopped_early": self.stopped_early, "outlook": self.outlook, "n_train": self.n_train,
            "n_validation": self.n_validation,
            "validation": self.validation, "test": self.test, "scale": dataclasses.asdict(self.scale),
        }  # fmt: skip


def study_run_dir(output_dir: Path, settings: StudySettings) -> Path:
    """The study's folder; for one outer fold of a nested cross-validation, ``learn/target-<t>/outer-<k>/<arch>``:
    beside that outer fold's own splits, as the study's folder is beside the target's."""
    run_dir = derivatives.study_dir(output_dir, settings.target, settings.architecture, settings.inputs)
    if settings.split.outer_test is None:
        return run_dir
    outer = "all" if settings.split.outer_test == EVERYONE else settings.split.outer_test
    return run_dir.parent / f"outer-{outer}" / run_dir.name
