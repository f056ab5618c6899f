"""Evaluation with scikit-learn's metrics: point estimates, subject-level bootstrap CIs, curves.

Images of one subject are not independent, so confidence intervals resample subjects (all their
images together), not images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

#: Bootstrap resamples for the confidence intervals, and their level.
N_BOOTSTRAP = 1000
CI_LEVEL = 0.95

CLASSIFICATION_METRICS = (
    "balanced_accuracy", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "mcc", "roc_auc", "pr_auc",
    "brier",
)  # fmt: skip
REGRESSION_METRICS = ("mae", "rmse", "r2", "pearson_r", "mean_bias")


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut that maximises Youden's J (sensitivity + specificity - 1).

    Chosen on validation data only; 0.5 when validation cannot decide (one class).

    >>> choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.35, 0.9]))
    0.35
    """
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p)
    finite = np.isfinite(thresholds)
    best = int(np.argmax((tpr - fpr)[finite]))
    return float(np.clip(thresholds[finite][best], 0.0, 1.0))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Every binary metric at ``threshold`` (positive class = 1), in NumPy: the bootstrap calls this a thousand times
    per evaluation, and scikit-learn's input checks made that seconds. The same values as scikit-learn's
    ``balanced_accuracy_score``, ``accuracy_score``, ``precision_recall_fscore_support`` (zero_division NaN),
    ``matthews_corrcoef``, ``roc_auc_score``, ``average_precision_score`` and ``brier_score_loss`` (a unit test holds
    them to it); NaN where a metric is undefined (a missing class).

    >>> m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]), 0.5)
    >>> m["roc_auc"], m["balanced_accuracy"], m["mcc"]
    (0.75, 0.5, 0.0)
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    predicted = p >= threshold
    positive = y == 1
    tp = float(np.sum(predicted & positive))
    fp = float(np.sum(predicted & ~positive))
    fn = float(np.sum(~predicted & positive))
    tn = float(np.sum(~predicted & ~positive))
    n_pos, n_neg, n = tp + fn, tn + fp, float(len(y))

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    sensitivity, specificity = ratio(tp, n_pos), ratio(tn, n_neg)
    present = [v for v in (sensitivity, specificity) if np.isfinite(v)]  # the classes in y, as scikit-learn
    # Matthews: scikit-learn's covariance form, 0 when a margin is constant
    predicted_pos = tp + fp
    cov_pp = n * n - (predicted_pos**2 + (n - predicted_pos) ** 2)
    cov_tt = n * n - (n_pos**2 + n_neg**2)
    cov_tp = (tp + tn) * n - (n_pos * predicted_pos + n_neg * (n - predicted_pos))
    both = n_pos > 0 and n_neg > 0
    return {
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "accuracy": ratio(tp + tn, n),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "mcc": float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_tt * cov_pp > 0 else 0.0,
        "roc_auc": _mann_whitney_auc(positive, p) if both else float("nan"),
        "pr_auc": _average_precision(positive, p) if both else float("nan"),
        "brier": float(np.mean((p - y) ** 2)) if len(y) else float("nan"),
    }


def _mann_whitney_auc(positive: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count a half: the area under scikit-learn's ROC curve)."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(p) - n_pos
    return float((rankdata(p)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(positive: np.ndarray, p: np.ndarray) -> float:
    """Average precision as scikit-learn defines it: the precision at each distinct score (highest first, ties
    together) weighted by the recall gained there."""
    order = np.argsort(-p, kind="mergesort")
    scores, hits = p[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last row of each distinct score
    tps = np.cumsum(hits)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


#: The metrics paired bootstraps compare (the network against a baseline on the same resamples).
PAIRED_BINARY = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "brier")


def paired_binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """The metrics paired bootstraps compare (:data:`PAIRED_BINARY`, of :func:`binary_metrics`); NaN where a class
    is missing.

    >>> m = paired_binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]), 0.5)
    >>> m["roc_auc"], m["balanced_accuracy"]
    (0.75, 0.5)
    """
    every = binary_metrics(y, p, threshold)
    out = {key: every[key] for key in PAIRED_BINARY}
    if not (np.isfinite(every["sensitivity"]) and np.isfinite(every["specificity"])):
        out["balanced_accuracy"] = float("nan")  # one class: no balanced accuracy to compare
    return out


def paired_regression_metrics(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R^2 in NumPy (for paired bootstraps).

    >>> paired_regression_metrics(np.array([1.0, 2, 3]), np.array([1.0, 2, 4]))["mae"]
    0.3333333333333333
    """
    error = predicted - y
    spread = float(np.sum((y - y.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "r2": 1 - float(np.sum(error**2)) / spread if spread > 0 else float("nan"),
    }


def multiclass_metrics(y: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    predicted = probabilities.argmax(axis=1)
    labels = list(range(probabilities.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        out = {
            "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "accuracy": float(accuracy_score(y, predicted)),
            "f1": float(f1_score(y, predicted, average="macro", labels=labels, zero_division=np.nan)),
            "mcc": float(matthews_corrcoef(y, predicted)),
        }
        try:
            out["roc_auc"] = float(roc_auc_score(y, probabilities, multi_class="ovr", labels=labels))
        except ValueError:
            out["roc_auc"] = float("nan")
    return out


def regression_metrics(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R^2, Pearson r and mean bias (predicted - true), in NumPy (the bootstrap calls it a thousand times);
    R^2 as scikit-learn's ``r2_score`` (1 for a perfect fit of constant truth, else 0 there).

    >>> m = regression_metrics(np.array([1.0, 2, 3]), np.array([1.0, 2, 4]))
    >>> round(m["mae"], 3), round(m["mean_bias"], 3), round(m["r2"], 3)
    (0.333, 0.333, 0.5)
    """
    y = np.asarray(y, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    error = predicted - y
    residual = float(np.sum(error**2))
    spread = float(np.sum((y - y.mean()) ** 2)) if len(y) else 0.0
    r2 = (1 - residual / spread if spread > 0 else (1.0 if residual == 0 else 0.0)) if len(y) > 1 else float("nan")
    constant = len(y) < 2 or np.ptp(predicted) == 0 or np.ptp(y) == 0
    yc, pc = y - y.mean(), predicted - predicted.mean()
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "r2": float(r2),
        "pearson_r": float("nan") if constant else float(np.clip(np.sum(yc * pc) / np.sqrt(np.sum(yc**2) *
                                                                                                np.sum(pc**2)), -1, 1)),
        "mean_bias": float(np.mean(error)),
    }  # fmt: skip


def bootstrap_ci(
    metric: Callable[[np.ndarray], dict[str, float]],
    groups: Sequence[str],
    *,
    seed: int,
    n: int = N_BOOTSTRAP,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every metric, resampling groups (subjects) with replacement.

    ``metric(indices)`` computes the metrics on the rows at ``indices``.
    """
    labels = np.asarray(groups)
    unique = np.unique(labels)
    rows_of = {g: np.flatnonzero(labels == g) for g in unique}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    with warnings.catch_warnings():  # a resample may hold one class: its undefined metrics are NaN
        warnings.simplefilter("ignore")
        for _ in range(n):
            drawn = rng.choice(unique, size=len(unique), replace=True)
            indices = np.concatenate([rows_of[g] for g in drawn])
            for key, value in metric(indices).items():
                samples.setdefault(key, []).append(value)
    alpha = (1 - CI_LEVEL) / 2
    out = {}
    for key, values in samples.items():
        finite = np.asarray(values)[np.isfinite(values)]
        out[key] = (
            (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha)))
            if len(finite) >= n // 2
            else (float("nan"), float("nan"))
        )
    return out


def evaluate_classification(
    y: np.ndarray, probabilities: np.ndarray, *, threshold: float, groups: Sequence[str], seed: int, ci: bool = True
) -> dict[str, Any]:
    """Metrics (+ CIs), the confusion matrix, ROC / PR / calibration curves of one set."""
    y = y.astype(int)
    n_classes = probabilities.shape[1]
    if n_classes == 2:
        p = probabilities[:, 1]

        def compute(idx: np.ndarray) -> dict[str, float]:
            return binary_metrics(y[idx], p[idx], threshold)

        predicted = (p >= threshold).astype(int)
    else:

        def compute(idx: np.ndarray) -> dict[str, float]:
            return multiclass_metrics(y[idx], probabilities[idx])

        predicted = probabilities.argmax(axis=1)
    result: dict[str, Any] = {
        "n": len(y),
        "n_subjects": len(set(groups)),
        "metrics": compute(np.arange(len(y))),
        "confusion": confusion_matrix(y, predicted, labels=list(range(n_classes))).tolist(),
    }
    if ci:
        result["ci"] = bootstrap_ci(compute, groups, seed=seed)
    if n_classes == 2 and len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        precision, recall, _ = precision_recall_curve(y, p)
        bins = int(min(10, max(2, len(y) // 5)))
        true_frac, mean_pred = calibration_curve(y, p, n_bins=bins, strategy="quantile")
        result["curves"] = {
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            "pr": {"recall": recall.tolist(), "precision": precision.tolist()},
            "calibration": {"predicted": mean_pred.tolist(), "observed": true_frac.tolist()},
        }
    return result


def scored(
    compute: Callable[[np.ndarray], dict[str, float]], groups: Sequence[str], *, seed: int, ci: bool = True
) -> dict[str, Any]:
    """What every evaluation records (reports and model cards read it): the number of images and subjects, the
    metrics ``compute`` gives on every image (its argument: the images' indices), and their bootstrap CIs
    (resampling subjects, ``groups``: each image's participant) when ``ci``."""
    result: dict[str, Any] = {
        "n": len(groups),
        "n_subjects": len(set(groups)),
        "metrics": compute(np.arange(len(groups))),
    }
    if ci:
        result["ci"] = bootstrap_ci(compute, groups, seed=seed)
    return result


def evaluate_regression(
    y: np.ndarray, predicted: np.ndarray, *, groups: Sequence[str], seed: int, ci: bool = True
) -> dict[str, Any]:
    def compute(idx: np.ndarray) -> dict[str, float]:
        return regression_metrics(y[idx], predicted[idx])

    return scored(compute, groups, seed=seed, ci=ci)


def fold_summary(per_fold: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation (ddof 1) of each metric over folds.

    >>> fold_summary([{"mae": 1.0}, {"mae": 3.0}])
    {'mae': {'mean': 2.0, 'std': 1.4142135623730951}}
    """
    keys = list(dict.fromkeys(k for fold in per_fold for k in fold))
    out = {}
    for key in keys:
        values = np.array([fold.get(key, np.nan) for fold in per_fold], dtype=float)
        finite = values[np.isfinite(values)]
        out[key] = {
            "mean": float(finite.mean()) if len(finite) else float("nan"),
            "std": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
        }
    return out
