"""A linear baseline beside every whole-image model: does the network beat a linear model on the same voxels?

Wen et al. (2020, ClinicaDL's authors) found a linear SVM on T1w voxels often as good as a 3D CNN. So each study
also fits a regularised linear model (classification: L2 logistic regression; regression: ridge) on the same
model-grid arrays, in the same splits: each fold's model learns from that fold's training images only, its
regularisation chosen by an inner cross-validation over those images (grouped by participant), its threshold on
the fold's validation images, and the folds' mean is scored once on the test set, as the network's ensemble is.

Millions of voxels and tens to thousands of images: the model is fitted in the span of the training images (by
the representer theorem an L2-penalised linear model's weights lie there), through the Gram matrix of the
centred arrays. That is exact, not an approximation, and needs each array read once.

The comparison is paired: the same bootstrap resamples of test participants score both models, and the
difference (network minus baseline) gets a percentile interval.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import evaluate

LOGGER = logging.getLogger(__name__)

#: The regularisation strengths the inner cross-validation chooses from (features scaled to unit mean square
#: norm): the inverse penalty C of logistic regression, the penalty alpha of ridge.
GRID = tuple(float(v) for v in np.logspace(-3, 3, 7))
#: Inner cross-validation folds (fewer when the training images are too few).
INNER_FOLDS = 5
#: Arrays read at once when the Gram matrix is made.
GRAM_BLOCK = 32


@dataclass(frozen=True)
class LinearModel:
    """A task's linear baseline: classification (logistic regression) or values (ridge)."""

    name: str
    discrete: bool

    def estimator(self, strength: float, seed: int) -> Any:
        from sklearn.linear_model import LogisticRegression, Ridge

        if self.discrete:
            return LogisticRegression(C=strength, max_iter=5000, random_state=seed)
        return Ridge(alpha=strength)

    def inner_splits(self, y: np.ndarray, groups: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Inner folds over the training images, grouped by participant (stratified by class when discrete)."""
        from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

        n_groups = len(np.unique(groups))
        if n_groups < 2:
            return []
        if self.discrete:
            smallest = int(min(len(np.unique(groups[y == c])) for c in np.unique(y)))
            if smallest < 2:
                return []
            k = min(INNER_FOLDS, smallest, n_groups)
            splitter: Any = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
            folds = list(splitter.split(np.zeros(len(y)), y.astype(int), groups))
            # an inner training part needs every class (tiny cohorts)
            return [(a, b) for a, b in folds if len(np.unique(y[a])) == len(np.unique(y))]
        k = min(INNER_FOLDS, n_groups)
        return list(GroupKFold(k).split(np.zeros(len(y)), y, groups))

    def inner_score(self, estimator: Any, z: np.ndarray, y: np.ndarray, n_classes: int) -> float:
        """Larger is better: minus the log loss (classes) or minus the mean absolute error (values)."""
        if self.discrete:
            return -float(_log_loss(y.astype(int), self.outputs(estimator, z, n_classes)))
        return -float(np.mean(np.abs(estimator.predict(z) - y)))

    def outputs(self, estimator: Any, z: np.ndarray, n_classes: int) -> np.ndarray:
        """What the network's outputs are: class probabilities ``(n, k)``, or values ``(n,)``."""
        if not self.discrete:
            return np.asarray(estimator.predict(z), dtype=np.float64)
        out = np.zeros((len(z), n_classes))
        out[:, estimator.classes_.astype(int)] = estimator.predict_proba(z)
        return out


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0))))


def gram_matrix(paths: Sequence[Path]) -> np.ndarray:
    """``X X^T`` of the flattened arrays at ``paths`` (float64), each array read once per block pair."""
    n = len(paths)
    gram = np.zeros((n, n))
    blocks = [list(range(i, min(i + GRAM_BLOCK, n))) for i in range(0, n, GRAM_BLOCK)]

    def read(block: list[int]) -> np.ndarray:
        return np.stack([np.load(paths[i], mmap_mode="r").reshape(-1) for i in block]).astype(np.float64)

    for a, rows_a in enumerate(blocks):
        xa = read(rows_a)
        gram[np.ix_(rows_a, rows_a)] = xa @ xa.T
        for rows_b in blocks[a + 1 :]:
            product = xa @ read(rows_b).T
            gram[np.ix_(rows_a, rows_b)] = product
            gram[np.ix_(rows_b, rows_a)] = product.T
    return gram


def span_features(gram: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Features of every image in the span of the training images, centred on their mean and scaled so that
    their mean squared norm is 1: inner products are those of the centred voxel vectors, exactly.

    >>> x = np.random.default_rng(0).normal(size=(6, 50))
    >>> z = span_features(x @ x.T, np.arange(4))
    >>> xc = (x - x[:4].mean(0)); xc /= np.sqrt((xc[:4] ** 2).sum(1).mean())
    >>> bool(np.allclose(z @ z[:4].T, xc @ xc[:4].T))
    True
    """
    a = gram[:, train].mean(axis=1)  # <x_i, m>, m the training mean
    c = a[train].mean()  # <m, m>
    centred = gram - a[:, None] - a[None, :] + c
    centred /= max(float(np.mean(np.diag(centred)[train])), 1e-12)
    values, vectors = np.linalg.eigh(centred[np.ix_(train, train)])
    keep = values > values.max() * 1e-10
    values, vectors = values[keep], vectors[:, keep]
    return centred[:, train] @ vectors / np.sqrt(values)


def fit_fold(
    model: LinearModel, z: np.ndarray, y: np.ndarray, groups: np.ndarray, train: np.ndarray, *, n_classes: int,
    seed: int,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The fold's estimator, its regularisation chosen by inner cross-validation over ``train`` only."""
    inner = model.inner_splits(y[train], groups[train], seed)
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes of the weakest penalties
        for strength in GRID if inner else ():
            fold_scores = []
            for a, b in inner:
                estimator = model.estimator(strength, seed).fit(z[train][a], y[train][a])
                fold_scores.append(model.inner_score(estimator, z[train][b], y[train][b], n_classes))
            scores.append(float(np.mean(fold_scores)))
        # too few training participants for an inner cross-validation: the grid's middle, recorded as such
        best = int(np.nanargmax(scores)) if scores else len(GRID) // 2
        if model.discrete and len(np.unique(y[train])) < 2:  # one class to learn from: its prior, said so
            from sklearn.dummy import DummyClassifier

            return DummyClassifier(strategy="prior").fit(z[train], y[train]), {
                "strength": float("nan"), "inner_folds": 0, "inner_scores": [], "note": "one class in training"}
        estimator = model.estimator(GRID[best], seed).fit(z[train], y[train])
    return estimator, {"strength": GRID[best], "inner_folds": len(inner), "inner_scores": scores}


def tabular_features(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Features of a table (one row per image, NaN where a value is missing) for a fold whose training rows are
    ``train``: missing values filled with the training rows' median, each column standardised with the training
    rows' mean and SD (a constant column left at 0), scaled to unit mean square norm as :func:`span_features`
    does; nothing of the other rows is used.

    >>> z = tabular_features(np.array([[1.0, 5.0], [3.0, np.nan], [100.0, 7.0]]))(np.array([0, 1]))
    >>> np.round(z[:, 1], 3).tolist()  # the second row's gap filled with the training median (5), the third not used
    [0.0, 0.0, 0.0]
    """
    x = np.asarray(x, dtype=np.float64)

    def features(train: np.ndarray) -> np.ndarray:
        median = np.nanmedian(x[train], axis=0)
        median = np.where(np.isfinite(median), median, 0.0)
        filled = np.where(np.isfinite(x), x, median)
        mean, sd = filled[train].mean(axis=0), filled[train].std(axis=0)
        z = (filled - mean) / np.where(sd > 0, sd, 1.0)
        z[:, sd == 0] = 0.0
        return z / max(float(np.sqrt((z[train] ** 2).sum(axis=1).mean())), 1e-12)

    return features


def run_baseline(
    model: LinearModel, images: pd.DataFrame, members: Sequence[dict[str, list[str]]], *, y: np.ndarray,
    n_classes: int, seed: int, gram: np.ndarray | None = None,
    features: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Each fold's linear model (trained on its training images), its outputs on its validation images and on the
    test images. ``members``: each fold's participant lists; ``y``: the targets of ``images``' rows. The features:
    ``features`` (a fold's training rows -> every row's features, :func:`tabular_features`), else the span of the
    training images in ``gram`` (:func:`span_features`)."""
    if features is None:
        assert gram is not None, "a baseline needs the Gram matrix or a feature function"
        features = lambda train: span_features(gram, train)  # noqa: E731
    pids = images["participant_id"].to_numpy()
    groups = pids.astype(str)
    folds = []
    for fold, member in enumerate(members):
        train = np.flatnonzero(np.isin(pids, member["train"]))
        validation = np.flatnonzero(np.isin(pids, member["validation"]))
        test = np.flatnonzero(np.isin(pids, member["test"]))
        z = features(train)
        estimator, record = fit_fold(model, z, y, groups, train, n_classes=n_classes, seed=seed + fold)
        folds.append(
            {
                "fold": fold,
                **record,
                "validation_rows": validation,
                "test_rows": test,
                "validation_output": model.outputs(estimator, z[validation], n_classes),
                "test_output": model.outputs(estimator, z[test], n_classes),
            }
        )
    return {"folds": folds}


def paired_difference(
    compute_a: Callable[[np.ndarray], dict[str, float]],
    compute_b: Callable[[np.ndarray], dict[str, float]],
    groups: Sequence[str],
    *,
    seed: int,
    n: int = evaluate.N_BOOTSTRAP,
) -> dict[str, dict[str, Any]]:
    """Each metric's difference ``a - b`` on the same test images, its percentile interval over bootstrap resamples
    of participants (the same resamples for both), and the share of resamples where ``a`` scored higher.

    >>> g = [f"s{i}" for i in range(20)]
    >>> same = lambda idx: {"m": float(len(idx))}
    >>> paired_difference(same, same, g, seed=0, n=50)["m"]["difference"]
    0.0
    """
    labels = np.asarray(groups)
    unique = np.unique(labels)
    rows_of = {g: np.flatnonzero(labels == g) for g in unique}
    everything = np.arange(len(labels))
    point_a, point_b = compute_a(everything), compute_b(everything)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point_a if k in point_b}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            idx = np.concatenate([rows_of[g] for g in rng.choice(unique, size=len(unique), replace=True)])
            a, b = compute_a(idx), compute_b(idx)
            for key in samples:
                samples[key].append(a[key] - b[key])
    alpha = (1 - evaluate.CI_LEVEL) / 2
    out: dict[str, dict[str, Any]] = {}
    for key, values in samples.items():
        finite = np.asarray(values)[np.isfinite(values)]
        enough = len(finite) >= n // 2
        out[key] = {
            "difference": float(point_a[key] - point_b[key]),
            "ci": [float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))] if enough
            else [float("nan"), float("nan")],
            "share_a_higher": float(np.mean(finite > 0)) if enough else float("nan"),
        }  # fmt: skip
    return out


def verdict(metric: str, comparison: dict[str, Any], larger_is_better: bool) -> dict[str, str]:
    """Whether the network is better than the linear model on ``metric`` (its paired interval): ``better``,
    ``not_better`` (not shown better nor worse: the interval holds 0) or ``worse``, and a sentence for the report.

    >>> verdict("roc_auc", {"difference": 0.05, "ci": [0.01, 0.09]}, True)["result"]
    'better'
    >>> verdict("mae", {"difference": -0.5, "ci": [-1.0, 0.2]}, False)["result"]
    'not_better'
    """
    low, high = comparison["ci"]
    gain_low, gain_high = (low, high) if larger_is_better else (-high, -low)
    difference = comparison["difference"]
    interval = f"{metric} difference {difference:+.3f} (95% CI {low:+.3f} to {high:+.3f})"
    if not (np.isfinite(low) and np.isfinite(high)):
        return {"result": "undecided", "text": f"Undecided: the {metric} difference has no interval on this test set."}
    if gain_low > 0:
        return {"result": "better", "text": f"The deep model is better than a linear model on this data: {interval}."}
    if gain_high < 0:
        return {"result": "worse", "text": f"The deep model is worse than a linear model on this data: {interval}."}
    return {
        "result": "not_better",
        "text": f"The deep model is not shown better than a linear model on this data, nor shown worse (the interval "
        f"holds 0): {interval}.",
    }


def timed_gram(paths: Sequence[Path]) -> tuple[np.ndarray, float]:
    started = time.monotonic()
    gram = gram_matrix(paths)
    return gram, time.monotonic() - started
