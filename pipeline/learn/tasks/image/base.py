"""The whole-image tasks' family (one class or one value per image): what classification and regression share and
segmentation does not: their cohort, the site-leakage check, the pooled threshold, and what the participant level's
prediction (:mod:`.inference`) and the external evaluation (:mod:`.external`) ask of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ... import leakage
from ...cohort import build_cohort, cache_cohort
from ...task import Task, fold_scale, spread


class WholeImage(Task):
    """A task that predicts one target per image from its model-grid array."""

    # --- the cohort ----------------------------------------------------------------------------------------
    def build_cohort(
        self, manifest: pd.DataFrame, *, output_dir: Path, cache_dir: Path, qc: pd.DataFrame | None, settings: Any
    ) -> tuple[pd.DataFrame, list[str], list[dict[str, str]]]:
        cohort = build_cohort(
            manifest, task=self, target=settings.target, positive_class=settings.positive_class,
            output_dir=output_dir, resolution_mm=settings.model_resolution, qc=qc,
            exclude_qc_outliers=settings.exclude_qc_outliers, include_failed_qc=settings.include_failed_qc,
            inputs=settings.inputs,
        )  # fmt: skip
        return cache_cohort(cohort.table, cache_dir), cohort.classes, cohort.excluded

    def leakage_checks(self, subjects: pd.DataFrame, *, seed: int) -> list[dict[str, Any]]:
        return [leakage.check_site_leakage(subjects, task=self, seed=seed)]

    # --- evaluation ----------------------------------------------------------------------------------------
    def pooled_threshold(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> float:
        y = np.concatenate([rows["y"].to_numpy() for rows, _ in validation])
        return self.choose_threshold(y, np.concatenate([outputs for _, outputs in validation]))

    # --- a participant's prediction (:mod:`.inference`) ----------------------------------------------------
    def attribution_score(self, outputs: torch.Tensor) -> torch.Tensor:
        """The scalar per input that saliency and Grad-CAM explain."""
        return outputs[:, 0]

    def attribution_score_name(self, n_outputs: int) -> str:
        return "predicted value"

    def fold_output(self, raw: np.ndarray, fold: int, record: dict[str, Any]) -> np.ndarray:
        """One fold network's raw output for one image -> its prediction (:meth:`outputs`)."""
        return self.outputs(torch.from_numpy(raw)[None], fold_scale(record, fold))[0].numpy()

    def uncertainty(self, per_fold: Sequence[np.ndarray]) -> dict[str, Any]:
        """How much the ensemble's members (every fold of every model) disagree on one image."""
        return spread([np.ravel(p)[0] for p in per_fold], "the predicted value")

    # --- external evaluation (:mod:`.external`) -----------------------------------------------------------
    def external_reason(self, value: Any, column: str, classes: Sequence[str]) -> str | None:
        """Why a reference value cannot be evaluated against (None: it can)."""
        return None


def whole_image(task: Task) -> WholeImage:
    """``task``, checked to be a whole-image task (what the models of a whole-image prediction carry)."""
    if not isinstance(task, WholeImage):
        raise TypeError(f"the task {task.name!r} does not predict whole images")
    return task
