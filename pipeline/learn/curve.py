"""Curves: a learning curve (would more participants help?) and a training curve's outlook.

Each linear baseline (on the network's voxels, on the regional volumes) is fitted again in every fold on nested,
class-stratified subsets of the fold's training participants (a quarter, half, three quarters, all), with the
same inner selection of its regularisation and the threshold on the fold's validation participants; each subset's
fold ensemble is scored on the test participants (in a nested cross-validation, every participant: the outer folds'
outputs pooled). A curve still climbing at the full training set says more data would help; a flat one says the
model, not the cohort's size, limits it. A linear model is refitted in well under a second, so the curve costs
little; the network's own curve would cost one training per point, so the report shows the network's score at the
full training set beside it.

A training curve's outlook (:func:`projection`): where a validation score is heading as the epochs go on, which the
training log and the report show beside each fold's history.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .baseline import fit_fold
from .task import Task

#: The shares of each fold's training participants the curve is drawn at (the last: all of them).
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
#: The fewest training participants of each class a smaller point may have (fewer: the point is left out).
MIN_PER_CLASS = 3
#: A gain in the headline metric (from half the training participants to all) above which the curve "still climbs".
CLIMBING = 0.02


def training_subset(train: Sequence[str], targets: dict[str, float], fraction: float, *, discrete: bool,
                    seed: int) -> list[str]:  # fmt: skip
    """A share of the training participants: per class (or for values, overall) the first ``fraction`` of a seeded
    shuffle, so a smaller subset is part of every larger one.

    >>> t = {f"s{i}": float(i % 2) for i in range(8)}
    >>> small = training_subset(list(t), t, 0.5, discrete=True, seed=0)
    >>> len(small), set(small) <= set(training_subset(list(t), t, 0.75, discrete=True, seed=0))
    (4, True)
    """
    rng = np.random.default_rng(seed)
    pids = sorted(train)
    groups = ([sorted(p for p in pids if targets[p] == c) for c in sorted({targets[p] for p in pids})] if discrete
              else [pids])  # fmt: skip
    chosen: list[str] = []
    for group in groups:
        order = [group[i] for i in rng.permutation(len(group))]
        chosen += order[: max(1, math.ceil(fraction * len(order)))]
    return sorted(chosen)


def learning_curve(
    task: Task, images: pd.DataFrame, members: Sequence[dict[str, list[str]]], *, y: np.ndarray, n_classes: int,
    seed: int, features: Callable[[np.ndarray], np.ndarray], fractions: Sequence[float] = FRACTIONS,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each point: the share, the mean number of training participants per fold, the threshold (the folds'
    validation outputs pooled) and the fold ensemble's test output; ``features``: a fold's training rows -> every
    row's features (:func:`~.baseline.span_features` on the Gram matrix, or :func:`~.baseline.tabular_features`)."""
    model = task.linear_baseline
    assert model is not None
    pids = images["participant_id"].astype(str).to_numpy()
    rows = images.assign(y=y)
    per_subject = rows.groupby("participant_id")["y"].first().to_dict()
    points = []
    for share in fractions:
        outputs, validation, sizes = [], [], []
        for fold, member in enumerate(members):
            subset = training_subset(member["train"], per_subject, share, discrete=model.discrete,
                                     seed=seed * 1000 + fold)  # fmt: skip
            smallest = (min(sum(per_subject[p] == c for p in subset) for c in {per_subject[p] for p in member["train"]})
                        if model.discrete else len(subset) // 2)  # fmt: skip
            if smallest < MIN_PER_CLASS and share < 1:  # all of them: the baseline itself, however few
                break
            train = np.flatnonzero(np.isin(pids, subset))
            val = np.flatnonzero(np.isin(pids, member["validation"]))
            test = np.flatnonzero(np.isin(pids, member["test"]))
            z = features(train)
            estimator, _ = fit_fold(model, z, y, pids, train, n_classes=n_classes, seed=seed + fold)
            validation.append((rows.iloc[val], model.outputs(estimator, z[val], n_classes)))
            outputs.append(model.outputs(estimator, z[test], n_classes))
            sizes.append(len(subset))
        else:
            threshold = task.pooled_threshold(validation)
            points.append({"fraction": share, "n_train": float(np.mean(sizes)), "threshold": threshold,
                           "test_output": task.ensemble(outputs)})  # fmt: skip
    return points


def scored(task: Task, test_rows: pd.DataFrame, points: Sequence[dict[str, Any]], headline: str,
           seed: int) -> list[dict[str, Any]]:  # fmt: skip
    """The points scored on ``test_rows`` (the headline metric and its interval); what ``results.json`` keeps."""
    out = []
    for point in points:
        evaluation = task.evaluate_rows(test_rows, point["test_output"], threshold=point["threshold"], seed=seed,
                                        ci=True)  # fmt: skip
        out.append({"fraction": point["fraction"], "n_train": round(point["n_train"], 1),
                    "threshold": point["threshold"], "metric": headline,
                    "value": evaluation["metrics"].get(headline),
                    "ci": evaluation.get("ci", {}).get(headline, [float("nan"), float("nan")])})  # fmt: skip
    return out


def outlook(points: Sequence[dict[str, Any]], larger_is_better: bool) -> dict[str, Any] | None:
    """What the curve says: the change of the headline metric from half the training participants to all of them,
    and whether the curve still climbs (more participants would likely help) or is flat.

    >>> outlook([{"fraction": 0.5, "n_train": 20, "value": 0.70, "metric": "roc_auc"},
    ...          {"fraction": 1.0, "n_train": 40, "value": 0.78, "metric": "roc_auc"}], True)["climbing"]
    True
    """
    half = next((p for p in points if p["fraction"] == 0.5), None)
    full = next((p for p in points if p["fraction"] == 1.0), None)
    if half is None or full is None or not all(np.isfinite([half["value"], full["value"]])):
        return None
    gain = (full["value"] - half["value"]) * (1 if larger_is_better else -1)
    climbing = bool(gain > CLIMBING)
    text = (f"From {half['n_train']:.0f} to {full['n_train']:.0f} training participants the linear model's "
            f"{full['metric']} changed by {full['value'] - half['value']:+.3f}: ")  # fmt: skip
    text += ("the curve still climbs, so more participants would likely help." if climbing else
             "the curve is flat, so more participants of the same kind are unlikely to help much; better inputs or "
             "a better model might.")  # fmt: skip
    return {"gain": float(gain), "climbing": climbing, "text": text}


def projection(
    history: Sequence[dict[str, Any]], key: str, epochs: int, ranges: Mapping[str, tuple[float, float]] | None = None
) -> dict[str, Any] | None:
    """Where a validation score is heading: ``y = a + b exp(-t / c)`` fitted to its trajectory (from 4 epochs).

    Returns the expected final value ``a`` (the plateau), the epoch by which the curve is within 1% of
    the way left to it, and a line for the log; None while too few epochs, when the fit fails, or when its
    plateau is not a value the metric can take or lies beyond ten times the planned epochs (a trajectory
    still climbing in a straight line says nothing of where it ends).

    >>> h = [{"val_dice": 0.9 - 0.8 * np.exp(-t / 3)} for t in range(1, 9)]
    >>> round(projection(h, "val_dice", 30, {"dice": (0.0, 1.0)})["expected"], 3)
    0.9
    >>> projection([{"val_dice": 0.1 * t} for t in range(1, 6)], "val_dice", 10, {"dice": (0.0, 1.0)}) is None
    True
    """
    values = np.array([row.get(key, np.nan) for row in history], dtype=float)
    t = np.arange(1, len(values) + 1, dtype=float)
    keep = np.isfinite(values)
    if keep.sum() < 4:
        return None
    from scipy.optimize import curve_fit

    def curve(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a + b * np.exp(-x / c)

    try:
        with np.errstate(all="ignore"):
            (a, _b, c), _ = curve_fit(
                curve, t[keep], values[keep], p0=(values[keep][-1], values[keep][0] - values[keep][-1], 3.0),
                bounds=([-np.inf, -np.inf, 0.3], [np.inf, np.inf, 10.0 * epochs]), maxfev=2000,
            )  # fmt: skip
    except (RuntimeError, ValueError):
        return None
    settle = float(np.ceil(c * np.log(100)))  # |b| e^{-t/c} < 1% of |b|
    expected = float(a)
    low, high = (ranges or {}).get(key.removeprefix("val_"), (-np.inf, np.inf))
    if not low <= expected <= high or settle > 10 * epochs:
        return None
    return {
        "expected": expected,
        "epoch": int(min(max(settle, 1), 10 * epochs)),
        "text": f"{key.removeprefix('val_')} heading to {expected:.3f} by epoch ~{int(settle)}",
    }
