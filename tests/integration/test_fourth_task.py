"""A fourth task is one module: ordinal grades of a numeric target (young < middle < old by age tertiles),
learned with a cumulative-link loss (K-1 logits, P(grade > k) = sigmoid), defined here, registered with
``register_task`` and run end to end by the group level (``--task grade``): cohort, splits and leakage checks,
training, the fold ensemble, the model package, ``results.json`` and the group report. Nothing else changes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F  # noqa: N812 - the usual name

from pipeline.learn import evaluate
from pipeline.learn.registry import register_task, unregister_task
from pipeline.learn.task import Criterion, TargetScale
from pipeline.learn.tasks.image import ImageTask
from pipeline.reports import learning as figures
from tests.helpers import fresh_output

GRADES = ("young", "middle", "old")


class Grades(ImageTask):
    """Ordinal grades: the target's tertiles, ordered; the network gives ``K - 1`` cumulative logits."""

    name = "grade"
    discrete = False  # ordered grades: the splits and the site check treat them as values
    stratify_by_target = False
    direction: ClassVar[dict[str, bool]] = {"loss": False, "grade_mae": False}
    metric_ranges: ClassVar[dict[str, tuple[float, float]]] = {"loss": (0.0, math.inf), "grade_mae": (0.0, 2.0)}
    evaluation_metrics = ("grade_mae", "accuracy")
    card_metrics = ("grade_mae", "accuracy")
    export_output = "grade probabilities (cumulative link, mean over folds)"

    def encode_targets(
        self, table: pd.DataFrame, target: str, positive_class: str | None
    ) -> tuple[pd.DataFrame, list[str]]:
        table = table.copy()
        grades = pd.qcut(pd.to_numeric(table["target"]), len(GRADES), labels=False, duplicates="drop")
        table["target"] = [GRADES[int(g)] for g in grades]
        table["y"] = grades.astype(float)
        return table, list(GRADES)

    def n_outputs(self, classes: Sequence[str]) -> int:
        return len(classes) - 1

    def subject_target(self, y: pd.Series) -> float:
        return float(y.mode().iloc[0])

    def target_summary(self, rows: pd.DataFrame) -> dict[str, Any]:
        return {str(k): int(v) for k, v in rows["target"].value_counts().sort_index().items()}

    def metrics(self, n_outputs: int) -> tuple[str, ...]:
        return ("grade_mae",)

    def loss(self, targets: np.ndarray, n_outputs: int, class_weighting: str) -> Criterion:
        def cumulative(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            above = (y[:, None] > torch.arange(out.shape[1], device=out.device)[None]).float()
            return F.binary_cross_entropy_with_logits(out.float(), above)

        return cumulative

    def outputs(self, raw: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        above = torch.sigmoid(raw)  # P(grade > k), k = 0 .. K-2
        ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
        return (torch.cat([ones, above], 1) - torch.cat([above, zeros], 1)).clamp_min(0)

    def validation_loss(self, criterion: Criterion, outputs: np.ndarray, targets: np.ndarray, scale: Any) -> float:
        return float(-np.mean(np.log(np.clip(outputs[np.arange(len(targets)), targets.astype(int)], 1e-7, 1))))

    def validation_scores(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        return {"grade_mae": float(np.mean(np.abs(outputs.argmax(1) - targets)))}

    def evaluate(
        self, y: np.ndarray, outputs: np.ndarray, *, threshold: float, groups: Sequence[str], seed: int, ci: bool
    ) -> dict[str, Any]:
        def compute(idx: np.ndarray) -> dict[str, float]:
            predicted = outputs[idx].argmax(1)
            return {"grade_mae": float(np.mean(np.abs(predicted - y[idx]))),
                    "accuracy": float(np.mean(predicted == y[idx]))}  # fmt: skip

        return evaluate.scored(compute, groups, seed=seed, ci=ci)

    def prediction_columns(
        self, table: pd.DataFrame, outputs: np.ndarray, classes: Sequence[str], threshold: float
    ) -> pd.DataFrame:
        for i, name in enumerate(classes):
            table[f"probability_{name}"] = outputs[:, i]
        table["predicted"] = [classes[i] for i in outputs.argmax(1)]
        table["expected_grade"] = outputs @ np.arange(len(classes))
        return table

    def error_size(self, table: pd.DataFrame) -> pd.Series:
        return (table["expected_grade"] - table["y"]).abs()

    def headline_metric(self, n_classes: int) -> str:
        return "grade_mae"

    def evaluation_figure(self, evaluation: dict[str, Any], classes: Sequence[str], table: pd.DataFrame) -> bytes:
        return figures.regression_panels(table["y"], table["expected_grade"])


@pytest.fixture(scope="module")
def grades():
    yield register_task(Grades())
    unregister_task("grade")


def test_the_probabilities_of_the_grades_sum_to_one(grades):
    raw = torch.tensor([[3.0, -3.0], [-4.0, -6.0], [5.0, 4.0]])
    probabilities = grades.outputs(raw, TargetScale())
    assert torch.allclose(probabilities.sum(1), torch.ones(3)) and probabilities.argmax(1).tolist() == [1, 0, 2]


def test_a_registered_task_runs_the_whole_group_level(grades, learning_sample, tmp_path):
    from pipeline.cli.run import main

    bids, derivatives = learning_sample
    out = fresh_output(derivatives, tmp_path / "derivatives")
    options = ["--task", "grade", "--target", "age", "--n-folds", "2", "--epochs", "2", "--batch-size", "4",
               "--model-resolution", "4", "--test-size", "0.25", "--nprocs", "1"]  # fmt: skip
    assert main([str(bids), str(out), "group", *options]) == 0
    results = json.loads((out / "learn" / "target-age" / "arch-conv5fc3" / "results.json").read_text())
    assert results["task"] == "grade" and results["classes"] == list(GRADES)
    assert set(results["test"]["metrics"]) == {"grade_mae", "accuracy"}
    package = next((out / "models").glob("age_conv5fc3_*"))
    record = json.loads((package / "model.json").read_text())
    assert record["task"] == "grade" and record["model"]["n_outputs"] == 2 and record["input"]["channels"] == ["T1w"]
    predictions = pd.read_csv(package / "predictions.tsv", sep="\t")
    assert {"probability_young", "probability_old", "expected_grade"} <= set(predictions.columns)
    assert "grade_mae" in (out / "group.html").read_text()
