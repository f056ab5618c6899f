"""Classification: one class per image (softmax outputs, cross-entropy, ROC/threshold evaluation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch.nn import functional as F  # noqa: N812 - the usual name

from ...errors import InputDataError
from ...reports import learning as figures
from .. import evaluate
from ..baseline import LinearModel
from ..task import Criterion, TargetScale, spread
from .image import ImageTask


def class_labels(values: pd.Series, positive_class: str | None) -> list[str]:
    """Class names in index order; with two classes the positive one is index 1.

    The default positive class is the rarer one (ties: the last in sorted order), the usual
    reading of "positive" for a diagnosis.

    >>> class_labels(pd.Series(["CN", "AD", "CN"]), None)
    ['CN', 'AD']
    """
    counts = values.astype(str).value_counts()
    labels = sorted(counts.index)
    if positive_class is not None and positive_class not in labels:
        raise InputDataError(
            f"--positive-class {positive_class!r} is not a value of the target; values: {', '.join(labels)}."
        )
    if len(labels) == 2:
        positive = positive_class or min(reversed(labels), key=lambda c: counts[c])
        labels = [c for c in labels if c != positive] + [positive]
    return labels


def class_of(value: Any, classes: Sequence[str]) -> str | None:
    """The model's class that ``value`` names (a TSV may read '1' as 1.0), or None.

    >>> class_of(1.0, ["0", "1"]), class_of("AD", ["CN", "AD"]), class_of("MCI", ["CN", "AD"])
    ('1', 'AD', None)
    """
    candidates = [str(value)]
    if isinstance(value, float | np.floating) and float(value).is_integer():
        candidates.append(str(int(value)))
    return next((c for c in candidates if c in classes), None)


class Classification(ImageTask):
    name = "classification"
    discrete = True
    direction: ClassVar[dict[str, bool]] = {"loss": False, "balanced_accuracy": True, "roc_auc": True}
    metric_ranges: ClassVar[dict[str, tuple[float, float]]] = {
        "loss": (0.0, math.inf),
        "balanced_accuracy": (0.0, 1.0),
        "roc_auc": (0.0, 1.0),
    }
    evaluation_metrics = evaluate.CLASSIFICATION_METRICS
    card_metrics = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")
    export_output = "class probabilities (softmax, mean over folds)"
    linear_baseline: ClassVar[LinearModel | None] = LinearModel("L2-regularised logistic regression", discrete=True)
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss", "brier"})

    def encode_targets(
        self, table: pd.DataFrame, target: str, positive_class: str | None
    ) -> tuple[pd.DataFrame, list[str]]:
        table = table.copy()
        table["target"] = table["target"].astype(str)
        present = sorted(set(table["target"]))
        if len(present) < 2:
            raise InputDataError(
                f"The target {target!r} has one class only ({present[0]!r}) among the {len(table)} usable images: "
                "a classifier needs at least two. Check participants.tsv or choose another --target."
            )
        classes = class_labels(table["target"], positive_class)
        table["y"] = table["target"].map({c: i for i, c in enumerate(classes)}).astype(float)
        return table, classes

    def n_outputs(self, classes: Sequence[str]) -> int:
        return len(classes)

    def subject_target(self, y: pd.Series) -> float:
        return float(y.mode().iloc[0])

    def target_summary(self, rows: pd.DataFrame) -> dict[str, Any]:
        return {str(k): int(v) for k, v in rows["target"].astype(str).value_counts().sort_index().items()}

    def metrics(self, n_outputs: int) -> tuple[str, ...]:
        return ("balanced_accuracy", "roc_auc") if n_outputs == 2 else ("balanced_accuracy",)

    def loss(self, targets: np.ndarray, n_outputs: int, class_weighting: str) -> Criterion:
        weight = None
        if class_weighting == "loss":
            counts = np.bincount(targets.astype(int), minlength=n_outputs).astype(np.float64)
            weight = torch.as_tensor(len(targets) / (n_outputs * np.maximum(counts, 1)), dtype=torch.float32)
        return lambda out, y: F.cross_entropy(
            out.float(), y.long(), weight=None if weight is None else weight.to(out.device)
        )

    def outputs(self, raw: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        return torch.softmax(raw, dim=1)

    def validation_loss(
        self, criterion: Criterion, outputs: np.ndarray, targets: np.ndarray, scale: TargetScale
    ) -> float:
        logits = torch.log(torch.as_tensor(np.clip(outputs, 1e-7, 1.0), dtype=torch.float32))
        return float(criterion(logits, torch.as_tensor(targets)))

    def validation_scores(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        y = targets.astype(int)
        scores = {"balanced_accuracy": float(balanced_accuracy_score(y, outputs.argmax(axis=1)))}
        if outputs.shape[1] == 2 and len(np.unique(y)) == 2:
            scores["roc_auc"] = float(roc_auc_score(y, outputs[:, 1]))
        return scores

    def choose_threshold(self, y: np.ndarray, outputs: np.ndarray) -> float:
        if outputs.ndim == 2 and outputs.shape[1] == 2:
            return evaluate.choose_threshold(y.astype(int), outputs[:, 1])
        return 0.5

    def evaluate(
        self, y: np.ndarray, outputs: np.ndarray, *, threshold: float, groups: Sequence[str], seed: int, ci: bool
    ) -> dict[str, Any]:
        return evaluate.evaluate_classification(y, outputs, threshold=threshold, groups=groups, seed=seed, ci=ci)

    def scores(self, y: np.ndarray, outputs: np.ndarray, threshold: float) -> dict[str, float]:
        if outputs.shape[1] == 2:
            return evaluate.paired_binary_metrics(y, outputs[:, 1], threshold)
        return evaluate.multiclass_metrics(y.astype(int), outputs)

    def prediction_columns(
        self, table: pd.DataFrame, outputs: np.ndarray, classes: Sequence[str], threshold: float
    ) -> pd.DataFrame:
        for i, name in enumerate(classes):
            table[f"probability_{name}"] = outputs[:, i]
        if len(classes) == 2:
            table["probability"] = outputs[:, 1]
            table["predicted"] = np.where(outputs[:, 1] >= threshold, classes[1], classes[0])
        else:
            table["predicted"] = [classes[i] for i in outputs.argmax(axis=1)]
        table["threshold"] = threshold
        return table

    def error_size(self, table: pd.DataFrame) -> pd.Series:
        if "probability" in table.columns:
            return (table["probability"] - table["y"]).abs()
        truth = table["y"].astype(int).to_numpy()
        probs = table[[c for c in table.columns if c.startswith("probability_")]].to_numpy()
        return pd.Series(1 - probs[np.arange(len(table)), truth], index=table.index)

    def attribution_score(self, outputs: torch.Tensor) -> torch.Tensor:
        if outputs.shape[1] == 2:
            return outputs[:, 1] - outputs[:, 0]  # the positive class's log-odds
        return outputs.gather(1, outputs.argmax(1, keepdim=True))[:, 0]

    def attribution_score_name(self, n_outputs: int) -> str:
        return "positive-class log-odds" if n_outputs == 2 else "predicted class logit"

    def prediction_fields(
        self, models: Sequence[dict[str, Any]], output: np.ndarray, per_model: Sequence[np.ndarray]
    ) -> dict[str, Any]:
        classes = models[0]["classes"]
        probabilities = {c: float(p) for c, p in zip(classes, output, strict=True)}
        fields: dict[str, Any] = {
            "probabilities": probabilities,
            "per_model": [{c: float(p) for c, p in zip(classes, out, strict=True)} for out in per_model],
        }
        if len(classes) == 2:
            threshold = float(np.mean([m["threshold"] for m in models]))
            fields.update(
                positive_class=classes[1],
                probability=probabilities[classes[1]],
                threshold=threshold,
                predicted=classes[1] if probabilities[classes[1]] >= threshold else classes[0],
            )
        else:
            fields["predicted"] = classes[int(np.argmax(output))]
        return fields

    def uncertainty(self, per_fold: Sequence[np.ndarray]) -> dict[str, Any]:
        """The spread of the members' probability of the positive class (two classes) or of the ensemble's predicted
        class, and the entropy of the ensemble's probabilities (0: certain, 1: every class alike)."""
        probabilities = np.asarray(per_fold, dtype=float)
        mean = probabilities.mean(axis=0)
        k = 1 if len(mean) == 2 else int(mean.argmax())
        quantity = "probability of the positive class" if len(mean) == 2 else "probability of the predicted class"
        entropy = float(-(mean * np.log(np.clip(mean, 1e-12, 1))).sum() / math.log(len(mean)))
        return {**spread(probabilities[:, k], quantity), "entropy": round(entropy, 4)}

    def external_row(self, record: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"predicted": record["predicted"]}
        for name in classes:
            row[f"probability_{name}"] = record["probabilities"][name]
        if len(classes) == 2:
            row["probability"] = record["probability"]
            row["threshold"] = record["threshold"]
        return row

    def external_reason(self, value: Any, column: str, classes: Sequence[str]) -> str | None:
        if class_of(value, classes) is None:
            return f"{column} = {value!r} is not a class of the model ({', '.join(classes)})"
        return None

    def external_evaluate(self, table: pd.DataFrame, classes: Sequence[str], *, seed: int) -> dict[str, Any]:
        y = table["target"].map(lambda v: classes.index(class_of(v, classes))).to_numpy()
        probabilities = table[[f"probability_{c}" for c in classes]].to_numpy(dtype=float)
        threshold = float(table["threshold"].iloc[0]) if len(classes) == 2 else 0.5
        return self.evaluate(
            y, probabilities, threshold=threshold, groups=table["participant_id"].tolist(), seed=seed, ci=True
        )

    def case_error(self, table: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.Series, str]:
        truth = [class_of(v, classes) for v in table["target"]]
        right = [table[f"probability_{c}"].iloc[i] for i, c in enumerate(truth)]
        return pd.Series(1.0 - np.asarray(right, dtype=float), index=table.index), "1 - probability of the true class"

    def headline_metric(self, n_classes: int) -> str:
        return "roc_auc" if n_classes == 2 else "balanced_accuracy"

    def chance_level(self, n_classes: int) -> tuple[str, float] | None:
        return ("roc_auc", 0.5) if n_classes == 2 else ("balanced_accuracy", 1 / max(n_classes, 1))

    def evaluation_figure(self, evaluation: dict[str, Any], classes: Sequence[str], table: pd.DataFrame) -> bytes:
        return figures.classification_panels(evaluation, classes)


TASK = Classification()
