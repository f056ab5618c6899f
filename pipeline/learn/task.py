"""The Task interface: what a learning task is, the methods every task implements (the tasks:
:mod:`pipeline.learn.tasks`, found and resolved by :mod:`pipeline.learn.registry`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from .baseline import LinearModel

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TargetScale:
    """Regression targets are standardised for the loss; outputs are mapped back."""

    mean: float = 0.0
    sd: float = 1.0


#: Targets used as they are.
NO_SCALE = TargetScale()


def target_scale(task: Task, y: np.ndarray) -> TargetScale:
    """The scale of a fold's training targets ``y`` for ``task``'s loss: their mean and SD where the task scales its
    targets (:attr:`Task.scaled_targets`), else :data:`NO_SCALE`.

    >>> class Scaled(Task):
    ...     scaled_targets = True
    >>> target_scale(Scaled(), np.array([60.0, 70.0, 80.0]))
    TargetScale(mean=70.0, sd=8.16496580927726)
    >>> target_scale(Task(), np.array([0.0, 1.0]))
    TargetScale(mean=0.0, sd=1.0)
    """
    if not task.scaled_targets:
        return NO_SCALE
    return TargetScale(float(y.mean()), float(y.std()) or 1.0)


class Task:
    """What the machinery below the tasks (training, the study, inference, export, the reports) asks of every task,
    grouped by role: the cohort, targets, training, evaluation, inference, reports. A method raising
    NotImplementedError has no default: each task family implements it (the whole-image tasks' in
    :class:`~pipeline.learn.tasks.image.base.WholeImage`, segmentation's in its package); one with a body is a default
    that more than one task keeps. No method here is one task's alone (tests/unit/test_architecture.py): what only the
    whole-image tasks need (their ensemble's spread, attribution, the threshold of a class probability, the gathered
    columns of a prediction) is their family's, what only segmentation needs is segmentation's. ``encode_targets``
    and ``scores`` are reached on whole-image paths only (the image-level cohort, the linear baseline's comparison:
    segmentation encodes its label images in its own cohort and has no linear baseline)."""

    name: str = ""
    #: Whether targets are categories (splits stratify by class and check class counts).
    discrete: bool = False
    #: Whether the task learns reference label images (the parser then asks for --labels and --label-desc).
    learns_labels: bool = False
    #: Whether the network is fed ``(x - training mean image) / residual SD`` (whole-image tasks).
    standardize_inputs: bool = True
    #: Whether the splits stratify by the target when --stratify is not given.
    stratify_by_target: bool = True
    #: The splits each fold predicts (and tabulates) after training.
    predicted_splits: tuple[str, ...] = ("train", "validation", "test")
    #: Whether the loss sees standardised targets (each fold's mean and SD travel in ``model.json``).
    scaled_targets: bool = False
    #: Validation metric -> whether larger is better ("loss" is every task's).
    direction: ClassVar[dict[str, bool]] = {"loss": False}
    #: Validation metric -> the values it can take (a curve fitted to its course must plateau inside them).
    metric_ranges: ClassVar[dict[str, tuple[float, float]]] = {"loss": (0.0, math.inf)}
    #: Learning settings whose default differs for this task (the others are :class:`~pipeline.config.RunConfig`'s);
    #: the parser applies them and ``--help`` shows them.
    defaults: ClassVar[dict[str, Any]] = {}
    #: The networks that fit this task (names of :data:`pipeline.learn.models.ARCHITECTURES`).
    architectures: tuple[str, ...] = ("conv5fc3", "densenet121", "resnet10", "resnet18")
    #: The metrics of the full evaluation, in the order the report shows them.
    evaluation_metrics: tuple[str, ...] = ()
    #: Test metrics a model card shows, in order.
    card_metrics: tuple[str, ...] = ()
    #: What an exported ensemble returns (the export's sidecar).
    export_output: str = ""
    #: The linear model fitted beside the network on the same voxels (:mod:`pipeline.learn.baseline`); None: none.
    linear_baseline: ClassVar[LinearModel | None] = None
    #: Evaluation metrics where smaller is better (the baseline comparison reads them).
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss"})
    #: The cohort table's columns that a prediction table keeps (before the task's prediction columns).
    prediction_row_columns: tuple[str, ...] = ("participant_id", "session_id", "source", "target", "y")

    # --- the cohort ----------------------------------------------------------------------------------------
    def build_cohort(
        self, manifest: pd.DataFrame, *, output_dir: Path, cache_dir: Path, qc: pd.DataFrame | None, settings: Any
    ) -> tuple[pd.DataFrame, list[str], list[dict[str, str]]]:
        """The images learned from (one row each: ``y``, cached ``array`` ...), the class names and the images
        left out with the reason. ``settings``: the study's (:class:`~pipeline.learn.study.StudySettings`)."""
        raise NotImplementedError

    def leakage_checks(self, subjects: pd.DataFrame, *, seed: int) -> list[dict[str, Any]]:
        """Leakage checks of this task beyond those of every task (subject overlap, identical images)."""
        return []

    # --- targets -------------------------------------------------------------------------------------------
    def encode_targets(
        self, table: pd.DataFrame, target: str, positive_class: str | None
    ) -> tuple[pd.DataFrame, list[str]]:
        """``table`` with a numeric ``y`` column, and the class names (empty when there are none)."""
        raise NotImplementedError

    def n_outputs(self, classes: Sequence[str]) -> int:
        return 1

    def subject_target(self, y: pd.Series) -> float:
        """One subject's target from its images' (for the splits)."""
        raise NotImplementedError

    def target_summary(self, rows: pd.DataFrame) -> dict[str, Any]:
        """What the split table shows of the targets of ``rows``."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------------------------
    def metrics(self, n_outputs: int) -> tuple[str, ...]:
        """The validation metrics recorded each epoch (after the loss)."""
        return ()

    def loss(self, targets: np.ndarray, n_outputs: int, class_weighting: str) -> Criterion:
        raise NotImplementedError

    def loss_targets(self, y: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        """Targets as the loss sees them."""
        return y

    def predict(
        self, run: Callable[[torch.Tensor], torch.Tensor], data: Any, *, scale: TargetScale, batch_size: int
    ) -> np.ndarray:
        """Predictions of every item of ``data``; ``run`` maps a CPU input batch to raw CPU outputs."""
        raise NotImplementedError

    def outputs(self, raw: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        """The one post-processing of one network's raw outputs ``(n, k, ...)``: class probabilities, or values in
        target units. Training's evaluation, the participant level's inference and an exported ensemble (traced)
        all compute it here; an ensemble is the mean of its networks' outputs."""
        raise NotImplementedError

    def validation_loss(
        self, criterion: Criterion, outputs: np.ndarray, targets: np.ndarray, scale: TargetScale
    ) -> float:
        raise NotImplementedError

    def validation_scores(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def after_validation(self, outputs: Any, data: Any, *, run_dir: Any, epoch: int) -> None:
        """Evidence of one epoch's validation beside the checkpoint (e.g. the worst case, drawn)."""
        raise NotImplementedError

    def dataset(self, rows: pd.DataFrame, *, patch_size: int, n_outputs: int) -> Any:
        """What :func:`~pipeline.learn.train.fit` trains on or predicts: cached arrays and targets of ``rows``."""
        raise NotImplementedError

    def features(self, network: torch.nn.Module, data: Any, *, device: Any, batch_size: int = 8) -> np.ndarray:
        """The network's features ``(n, D)`` of every item of ``data``: what the distribution check describes
        (:mod:`pipeline.learn.ood`)."""
        raise NotImplementedError

    def ensemble(self, outputs: Sequence[Any]) -> Any:
        """The folds' outputs on one set of images, combined (the mean)."""
        raise NotImplementedError

    def evaluate_rows(
        self, rows: pd.DataFrame, outputs: Any, *, threshold: float, seed: int, ci: bool
    ) -> dict[str, Any]:
        """The evaluation of ``outputs`` against the targets of ``rows`` (CIs resample participants)."""
        raise NotImplementedError

    def postprocessing(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> dict[str, Any]:
        """Post-processing chosen on every fold's validation outputs ``(rows, outputs)``; recorded in
        ``model.json`` and ``results.json``."""
        raise NotImplementedError

    def postprocessed(self, outputs: Any, postprocessing: dict[str, Any]) -> Any:
        """``outputs`` with the chosen post-processing applied (what the ensemble's evaluation scores)."""
        raise NotImplementedError

    def package_fields(self, *, classes: Sequence[str], settings: Any) -> dict[str, Any]:
        """What ``model.json`` records besides what every task records (overrides included)."""
        raise NotImplementedError

    def finish_study(self, rows: pd.DataFrame, ensemble: Any, *, run_dir: Any, settings: Any) -> dict[str, Any]:
        """Extra results of the test set's ensemble outputs (written beside ``results.json``)."""
        raise NotImplementedError

    # --- evaluation ----------------------------------------------------------------------------------------
    def pooled_threshold(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> float:
        """The ensemble's threshold, chosen on every fold's validation outputs ``(rows, outputs)`` pooled."""
        raise NotImplementedError

    def scores(self, y: np.ndarray, outputs: np.ndarray, threshold: float) -> dict[str, float]:
        """The main metrics of ``outputs`` against ``y``, fast (no intervals, no curves; the headline metric among
        them): what paired bootstraps compare."""
        raise NotImplementedError

    def prediction_columns(
        self, table: pd.DataFrame, outputs: np.ndarray, classes: Sequence[str], threshold: float
    ) -> pd.DataFrame:
        """Add the prediction columns of ``outputs`` to ``table`` (one row per image)."""
        raise NotImplementedError

    def error_size(self, table: pd.DataFrame) -> pd.Series:
        """How wrong each row of a prediction table is (the report shows the worst)."""
        raise NotImplementedError

    # --- inference -----------------------------------------------------------------------------------------
    def predict_participant(
        self, spec: dict[str, Any], out_dir: Path, models: Sequence[Any], *, seen: Sequence[str], device: Any
    ) -> dict[str, Any]:
        """The participant level's prediction of one image by ``models`` (:class:`~pipeline.learn.ensemble.
        LoadedModel`), written into ``out_dir``: what the inference node hands on."""
        raise NotImplementedError

    def external_evaluation(self, run: Any) -> dict[str, Any]:
        """``group --model``: gather the participant level's predictions of ``run``
        (:class:`~pipeline.learn.external.ExternalRun`) and evaluate them where references are given."""
        raise NotImplementedError

    def prediction_fields(
        self, models: Sequence[dict[str, Any]], output: np.ndarray, per_model: Sequence[np.ndarray]
    ) -> dict[str, Any]:
        """The task's part of a prediction record (``predicted`` and what explains it)."""
        raise NotImplementedError

    def headline_metric(self, n_classes: int) -> str:
        raise NotImplementedError

    def chance_level(self, n_classes: int) -> tuple[str, float] | None:
        """The metric (larger is better) and its value that a model without information scores, against which the
        report says whether a model is distinguishable from chance; None where no such level is defined."""
        return None

    # --- reports -------------------------------------------------------------------------------------------
    def evaluation_figure(self, evaluation: dict[str, Any], classes: Sequence[str], table: pd.DataFrame) -> bytes:
        """The report's panels of one evaluation; ``table`` has columns ``y`` and ``predicted``."""
        raise NotImplementedError


def fold_scale(record: dict[str, Any], fold: int) -> TargetScale:
    """The target scale of fold ``fold`` of the model package ``record`` (:data:`NO_SCALE` when none is recorded)."""
    scales = record.get("target_scale") or []
    return TargetScale(float(scales[fold]["mean"]), float(scales[fold]["sd"])) if fold < len(scales) else NO_SCALE


def spread(values: Sequence[float] | np.ndarray, quantity: str) -> dict[str, Any]:
    """The spread of the ensemble members' ``quantity`` on one image: SD (None with one member) and range.

    >>> spread([0.2, 0.4], "p")
    {'quantity': 'p', 'members': 2, 'fold_sd': 0.1414, 'fold_range': [0.2, 0.4]}
    """
    v = np.asarray(values, dtype=float)
    return {"quantity": quantity, "members": len(v), "fold_sd": round(float(v.std(ddof=1)), 4) if len(v) > 1 else None,
            "fold_range": [round(float(v.min()), 4), round(float(v.max()), 4)]}  # fmt: skip


def chunks(n: int, size: int) -> list[np.ndarray]:
    """Index chunks of at most ``size`` covering ``range(n)``."""
    return [c for c in np.array_split(np.arange(n), max(1, math.ceil(n / size))) if len(c)]
