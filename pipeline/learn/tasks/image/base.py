"""The whole-image tasks' family (one class or one value per image): what classification and regression share and
segmentation does not: their cohort, the site-leakage check, their data and predictions (one array per image, the
ensemble's mean, no post-processing), the threshold, the evaluation, and what the participant level's prediction
(:mod:`.inference`) and the external evaluation (:mod:`.external`) ask of them. Segmentation implements the same
Task methods its own way (:mod:`pipeline.learn.tasks.segmentation`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ... import leakage, ood
from ...cohort import build_cohort, cache_cohort
from ...data import Volumes
from ...task import TargetScale, Task, chunks, fold_scale, spread


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

    # --- training ------------------------------------------------------------------------------------------
    def dataset(self, rows: pd.DataFrame, *, patch_size: int, n_outputs: int) -> Any:
        return Volumes(rows["array"].tolist(), rows["y"].to_numpy())

    def predict(
        self, run: Callable[[torch.Tensor], torch.Tensor], data: Any, *, scale: TargetScale, batch_size: int
    ) -> np.ndarray:
        raw = torch.cat([run(data.batch(chunk)[0]) for chunk in chunks(len(data), batch_size)])
        return self.postprocess(raw, scale)

    def postprocess(self, raw: torch.Tensor, scale: TargetScale) -> np.ndarray:
        """Raw network outputs ``(n, k)`` -> predictions, as evaluation tabulates them (float64)."""
        return self.outputs(raw, scale).numpy().astype(np.float64)

    def after_validation(self, outputs: Any, data: Any, *, run_dir: Any, epoch: int) -> None:
        """Nothing drawn: a whole-image prediction's validation is its curve."""

    def features(self, network: torch.nn.Module, data: Any, *, device: Any, batch_size: int = 8) -> np.ndarray:
        batches = (data.batch(chunk)[0] for chunk in chunks(len(data), batch_size))
        return ood.whole_image_features(network, batches, device)

    # --- the ensemble and the study ------------------------------------------------------------------------
    def ensemble(self, outputs: Sequence[Any]) -> Any:
        return np.mean(outputs, axis=0)

    def postprocessing(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> dict[str, Any]:
        """None: a whole-image prediction is its ensemble's mean."""
        return {}

    def postprocessed(self, outputs: Any, postprocessing: dict[str, Any]) -> Any:
        return outputs

    def package_fields(self, *, classes: Sequence[str], settings: Any) -> dict[str, Any]:
        """Nothing beyond what every task records."""
        return {}

    def finish_study(self, rows: pd.DataFrame, ensemble: Any, *, run_dir: Any, settings: Any) -> dict[str, Any]:
        """Nothing beyond ``results.json``."""
        return {}

    # --- evaluation ----------------------------------------------------------------------------------------
    def choose_threshold(self, y: np.ndarray, outputs: np.ndarray) -> float:
        """The decision threshold chosen on validation outputs (0.5 where none is chosen)."""
        return 0.5

    def pooled_threshold(self, validation: Sequence[tuple[pd.DataFrame, Any]]) -> float:
        y = np.concatenate([rows["y"].to_numpy() for rows, _ in validation])
        return self.choose_threshold(y, np.concatenate([outputs for _, outputs in validation]))

    def evaluate_rows(
        self, rows: pd.DataFrame, outputs: Any, *, threshold: float, seed: int, ci: bool
    ) -> dict[str, Any]:
        groups = rows["participant_id"].tolist()
        return self.evaluate(rows["y"].to_numpy(), outputs, threshold=threshold, groups=groups, seed=seed, ci=ci)

    def evaluate(
        self, y: np.ndarray, outputs: np.ndarray, *, threshold: float, groups: Sequence[str], seed: int, ci: bool
    ) -> dict[str, Any]:
        """The evaluation of ``outputs`` against ``y``: at least what :func:`pipeline.learn.evaluate.scored`
        records (``n``, ``n_subjects``, ``metrics``, ``ci``), which reports and model cards read."""
        raise NotImplementedError

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

    def external_row(self, record: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
        """The gathered columns of one participant-level prediction record."""
        return {"predicted": record["predicted"]}

    def external_evaluate(self, table: pd.DataFrame, classes: Sequence[str], *, seed: int) -> dict[str, Any]:
        """The evaluation of the gathered predictions of ``table`` against their ``target``."""
        raise NotImplementedError

    def case_error(self, table: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.Series, str]:
        """How wrong each gathered prediction of ``table`` (with its ``target``) is, and what that measures (lower is
        better): what the external evaluation compares between flagged and unflagged images."""
        raise NotImplementedError


def whole_image(task: Task) -> WholeImage:
    """``task``, checked to be a whole-image task (what the models of a whole-image prediction carry)."""
    if not isinstance(task, WholeImage):
        raise TypeError(f"the task {task.name!r} does not predict whole images")
    return task
