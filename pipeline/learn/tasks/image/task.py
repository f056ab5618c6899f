"""The whole-image tasks' common class (one class or one value per image): their cohort, the site-leakage check,
the participant level's prediction (:mod:`.inference`) and the external evaluation (:mod:`.external`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ... import leakage
from ...cohort import build_cohort, cache_cohort
from ...task import Task
from .external import evaluate_image_predictions
from .inference import predict_image


class ImageTask(Task):
    """A task that predicts one target per image from its model-grid array."""

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

    def pooled_threshold(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> float:
        y = np.concatenate([rows["y"].to_numpy() for rows, _ in validation])
        return self.choose_threshold(y, np.concatenate([outputs for _, outputs in validation]))

    def predict_participant(
        self, spec: dict[str, Any], out_dir: Path, models: Sequence[Any], *, seen: Sequence[str], device: Any
    ) -> dict[str, Any]:
        return predict_image(spec, out_dir, models, seen=seen, device=torch.device(device))

    def external_evaluation(self, run: Any) -> dict[str, Any]:
        return evaluate_image_predictions(run, self)
