"""The controls a study's result is read against: the linear baseline in the same splits, compared paired with the
network on the test set, and the permutation control (the study on shuffled training targets, expected at chance).
Plain functions over the cohort table, the folds' members and the task (:mod:`.study` calls them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import derivatives
from . import baseline, curve
from .task import Task

LOGGER = logging.getLogger(__name__)
BASELINE_PREDICTIONS = derivatives.STUDY_OUTPUTS["baseline_predictions"]


def permuted_targets(images: pd.DataFrame, test_ids: Sequence[str], seed: int) -> np.ndarray:
    """The targets ``y`` of ``images`` with the non-test participants' targets shuffled among them (a participant's
    images keep one target between them); the test participants' targets are untouched.

    >>> images = pd.DataFrame({"participant_id": ["a", "b", "c", "d"], "y": [0.0, 0.0, 1.0, 1.0]})
    >>> y = permuted_targets(images, ["d"], seed=1)
    >>> float(y[3]), sorted(y[:3].tolist())
    (1.0, [0.0, 0.0, 1.0])
    """
    per_subject = images.groupby("participant_id", sort=True)["y"].first()
    shuffled = per_subject[~per_subject.index.isin(list(test_ids))]
    rng = np.random.default_rng(seed)
    values = shuffled.to_numpy()
    for _ in range(100):  # a tiny cohort's shuffle can give its targets back unchanged: draw again
        permuted = values[rng.permutation(len(values))]
        if not np.array_equal(permuted, values):
            break
    mapping = dict(zip(shuffled.index, permuted, strict=True))
    pairs = zip(images["participant_id"], images["y"], strict=True)
    return np.array([mapping.get(p, y) for p, y in pairs], dtype=float)


def fit_baseline(
    task: Task, images: pd.DataFrame, members: Sequence[dict[str, list[str]]], *, y: np.ndarray, n_classes: int,
    seed: int, gram: np.ndarray | None = None, features: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The linear baseline's folds, its threshold (on every fold's validation outputs pooled, as the ensemble's)
    and its ensemble output on the test images (the mean of the folds'); on the voxels (``gram``) or on a table's
    ``features`` (:func:`~.baseline.run_baseline`)."""
    assert task.linear_baseline is not None
    fitted = baseline.run_baseline(task.linear_baseline, images, members, y=y, n_classes=n_classes, seed=seed,
                                   gram=gram, features=features)  # fmt: skip
    rows = images.assign(y=y)
    validation = [(rows.iloc[f["validation_rows"]], f["validation_output"]) for f in fitted["folds"]]
    return {
        "folds": fitted["folds"],
        "threshold": task.pooled_threshold(validation),
        "test_rows": rows.iloc[fitted["folds"][0]["test_rows"]],
        "test_output": task.ensemble([f["test_output"] for f in fitted["folds"]]),
    }


#: What the voxel baseline learns from (``features`` in results.json).
VOXEL_FEATURES = "the network's model-grid voxels (every channel), centred on each fold's training mean"


def baseline_study(
    task: Task, images: pd.DataFrame, members: Sequence[dict[str, list[str]]], *, classes: list[str],
    deep: tuple[np.ndarray, float], seed: int, run_dir: Path, timed_gram: tuple[np.ndarray, float] | None = None,
    table: tuple[np.ndarray, str] | None = None, predictions: str = BASELINE_PREDICTIONS,
) -> dict[str, Any]:  # fmt: skip
    """A linear baseline of a study: fitted fold by fold, scored on the test set with the network's bootstrap
    intervals, compared paired with the network's ensemble (``deep``: its test outputs and threshold); its
    ``predictions`` table written into ``run_dir``. On the model-grid voxels, or on ``table`` (one row of features
    per image, and what they are: the regional volumes' baseline). What ``results.json`` keeps under ``baseline``
    (or ``volumes_baseline``)."""
    assert task.linear_baseline is not None
    started = time.monotonic()
    y = images["y"].to_numpy(dtype=float)
    gram, gram_s, described = None, 0.0, VOXEL_FEATURES
    if table is None:
        gram, gram_s = timed_gram or baseline.timed_gram([Path(p) for p in images["array"]])
        features = lambda train: baseline.span_features(gram, train)  # noqa: E731
    else:
        x, described = table
        features = baseline.tabular_features(x)
    n_classes = max(len(classes), 1)
    fitted = fit_baseline(task, images, members, y=y, n_classes=n_classes, seed=seed, features=features)
    test_rows, output, threshold = fitted["test_rows"], fitted["test_output"], fitted["threshold"]
    evaluation = task.evaluate_rows(test_rows, output, threshold=threshold, seed=seed, ci=True)
    headline = task.headline_metric(len(classes))
    points = curve.learning_curve(task, images, members, y=y, n_classes=n_classes, seed=seed, features=features)
    deep_output, deep_threshold = deep
    truth = test_rows["y"].to_numpy()
    comparison = baseline.paired_difference(
        lambda idx: task.scores(truth[idx], deep_output[idx], deep_threshold),
        lambda idx: task.scores(truth[idx], output[idx], threshold),
        test_rows["participant_id"].astype(str).tolist(),
        seed=seed,
    )
    verdict = baseline.verdict(headline, comparison[headline], headline not in task.lower_is_better)
    LOGGER.info("Linear baseline (%s): test %s %.3f; %s", task.linear_baseline.name, headline,
                evaluation["metrics"][headline], verdict["text"])  # fmt: skip
    _write_predictions(task, images, fitted, classes, run_dir / predictions)
    return {
        "model": task.linear_baseline.name,
        "features": described,
        "predictions": predictions,
        "selection": f"inner {baseline.INNER_FOLDS}-fold cross-validation grouped by participant on each fold's "
        "training images only (minus log loss or minus MAE); threshold on the folds' validation images pooled",
        "grid": list(baseline.GRID),
        "folds": [
            {k: f[k] for k in ("fold", "strength", "inner_folds", "inner_scores")} for f in fitted["folds"]
        ],
        "threshold": threshold,
        "test": evaluation,
        "headline": headline,
        "comparison": comparison,
        "verdict": verdict,
        "wall_time_s": round(time.monotonic() - started, 2),
        "gram_time_s": round(gram_s, 2),
        "learning_curve": (scored := curve.scored(task, test_rows, points, headline, seed)),
        "learning_curve_outlook": curve.outlook(scored, headline not in task.lower_is_better),
        "test_output": output,  # for a nested assembly; taken out before results.json is written
        "curve_outputs": {p["fraction"]: p["test_output"] for p in points},  # likewise
    }


def permuted_baseline(
    task: Task, images: pd.DataFrame, members: Sequence[dict[str, list[str]]], *, y: np.ndarray, classes: list[str],
    seed: int, gram: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The linear baseline trained on shuffled targets (``y``: the test participants' untouched), scored against
    the test targets; ``gram``: the cohort's (:func:`~.baseline.gram_matrix`), read here when not given."""
    gram = baseline.gram_matrix([Path(p) for p in images["array"]]) if gram is None else gram
    fitted = fit_baseline(task, images, members, y=y, n_classes=max(len(classes), 1), seed=seed, gram=gram)
    return task.evaluate_rows(fitted["test_rows"], fitted["test_output"], threshold=fitted["threshold"], seed=seed,
                              ci=True)  # fmt: skip


def _write_predictions(
    task: Task, images: pd.DataFrame, fitted: dict[str, Any], classes: list[str], path: Path
) -> None:
    tables = []
    for fold in fitted["folds"]:
        for split, rows_key, output_key in (("validation", "validation_rows", "validation_output"),
                                            ("test", "test_rows", "test_output")):  # fmt: skip
            table = images.iloc[fold[rows_key]][list(task.prediction_row_columns)].copy()
            table.insert(3, "split", split)
            table.insert(4, "fold", str(fold["fold"]))
            tables.append(task.prediction_columns(table, fold[output_key], classes, fitted["threshold"]))
    table = fitted["test_rows"][list(task.prediction_row_columns)].copy()
    table.insert(3, "split", "test")
    table.insert(4, "fold", "ensemble")
    tables.append(task.prediction_columns(table, fitted["test_output"], classes, fitted["threshold"]))
    derivatives.write_text(
        path,
        pd.concat(tables, ignore_index=True).to_csv(sep="\t", index=False, float_format="%.6g"),
    )


def package_summary(trust: dict[str, Any]) -> dict[str, Any]:
    """What ``model.json`` records of the controls: the baseline's headline test score and the paired comparison,
    and the permutation control's headline score (the model card shows them)."""
    out: dict[str, Any] = {}
    for key in ("baseline", "volumes_baseline"):
        linear = trust.get(key)
        if not linear:
            continue
        headline = linear["headline"]
        out[key] = {
            "model": linear["model"],
            "metric": headline,
            "test": linear["test"]["metrics"][headline],
            "test_ci": linear["test"].get("ci", {}).get(headline),
            "difference": linear["comparison"][headline],
            "verdict": linear["verdict"],
            "features": linear["features"],
        }
    control = trust.get("permutation_control")
    if control:
        headline = control["headline"]
        out["permutation_control"] = {
            "metric": headline,
            "deep": control["deep"]["metrics"][headline],
            "baseline": control["baseline"]["metrics"][headline] if control.get("baseline") else None,
        }
    return out
