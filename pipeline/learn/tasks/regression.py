"""Regression: one value per image (standardised MSE, MAE/R² evaluation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F  # noqa: N812 - the usual name

from ...errors import InputDataError
from ...reports import learning as figures
from .. import evaluate
from ..baseline import LinearModel
from ..task import Criterion, TargetScale
from .image import ImageTask


class Regression(ImageTask):
    name = "regression"
    discrete = False
    scaled_targets = True
    direction: ClassVar[dict[str, bool]] = {"loss": False, "mae": False}
    metric_ranges: ClassVar[dict[str, tuple[float, float]]] = {"loss": (0.0, math.inf), "mae": (0.0, math.inf)}
    evaluation_metrics = evaluate.REGRESSION_METRICS
    card_metrics = ("mae", "rmse", "r2", "pearson_r")
    export_output = "predicted value (mean over folds)"
    linear_baseline: ClassVar[LinearModel | None] = LinearModel("ridge regression", discrete=False)
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss", "mae", "rmse"})

    def encode_targets(
        self, table: pd.DataFrame, target: str, positive_class: str | None
    ) -> tuple[pd.DataFrame, list[str]]:
        numeric = pd.to_numeric(table["target"], errors="coerce")
        if numeric.isna().any():
            bad = table.loc[numeric.isna(), "participant_id"].tolist()
            raise InputDataError(
                f"--task regression needs a numeric target, but {target!r} is not a number for {', '.join(bad)}."
            )
        table = table.copy()
        table["y"] = numeric.astype(float)
        return table, []

    def subject_target(self, y: pd.Series) -> float:
        return float(y.mean())

    def target_summary(self, rows: pd.DataFrame) -> dict[str, Any]:
        return {"mean": round(float(rows["y"].mean()), 2), "sd": round(float(rows["y"].std()), 2)}

    def metrics(self, n_outputs: int) -> tuple[str, ...]:
        return ("mae",)

    def loss(self, targets: np.ndarray, n_outputs: int, class_weighting: str) -> Criterion:
        return lambda out, y: F.mse_loss(out[:, 0].float(), y)

    def loss_targets(self, y: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        return (y - scale.mean) / scale.sd

    def outputs(self, raw: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        return raw * scale.sd + scale.mean

    def postprocess(self, raw: torch.Tensor, scale: TargetScale) -> np.ndarray:
        return self.outputs(raw.double(), scale)[:, 0].numpy()  # in float64, as the targets

    def validation_loss(
        self, criterion: Criterion, outputs: np.ndarray, targets: np.ndarray, scale: TargetScale
    ) -> float:
        scaled = (outputs - scale.mean) / scale.sd
        return float(np.mean((scaled - (targets - scale.mean) / scale.sd) ** 2))

    def validation_scores(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return {"mae": float(np.mean(np.abs(outputs - targets)))}

    def evaluate(
        self, y: np.ndarray, outputs: np.ndarray, *, threshold: float, groups: Sequence[str], seed: int, ci: bool
    ) -> dict[str, Any]:
        return evaluate.evaluate_regression(y, outputs, groups=groups, seed=seed, ci=ci)

    def scores(self, y: np.ndarray, outputs: np.ndarray, threshold: float) -> dict[str, float]:
        return evaluate.paired_regression_metrics(y, outputs)

    def prediction_columns(
        self, table: pd.DataFrame, outputs: np.ndarray, classes: Sequence[str], threshold: float
    ) -> pd.DataFrame:
        table["predicted"] = outputs
        table["error"] = outputs - table["y"].to_numpy()
        return table

    def error_size(self, table: pd.DataFrame) -> pd.Series:
        return table["error"].abs()

    def prediction_fields(
        self, models: Sequence[dict[str, Any]], output: np.ndarray, per_model: Sequence[np.ndarray]
    ) -> dict[str, Any]:
        return {"predicted": float(output[0]), "per_model": [float(out[0]) for out in per_model]}

    def external_evaluate(self, table: pd.DataFrame, classes: Sequence[str], *, seed: int) -> dict[str, Any]:
        y = pd.to_numeric(table["target"], errors="coerce").to_numpy(dtype=float)
        return self.evaluate(
            y, table["predicted"].to_numpy(dtype=float), threshold=0.5,
            groups=table["participant_id"].tolist(), seed=seed, ci=True,
        )  # fmt: skip

    def case_error(self, table: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.Series, str]:
        y = pd.to_numeric(table["target"], errors="coerce")
        return (table["predicted"].astype(float) - y).abs(), "absolute error"

    def headline_metric(self, n_classes: int) -> str:
        return "mae"

    def chance_level(self, n_classes: int) -> tuple[str, float] | None:
        return ("r2", 0.0)  # the training mean for everyone; its MAE depends on the data, its R^2 does not

    def evaluation_figure(self, evaluation: dict[str, Any], classes: Sequence[str], table: pd.DataFrame) -> bytes:
        return figures.regression_panels(table["y"], table["predicted"])


TASK = Regression()
