"""Leakage checks on the splits, each a pass / warning / fail record for the group report.

1. No participant ID in two splits (train / validation of a fold, development / test).
2. No identical image under two participant IDs across splits (voxel-data hash of the raw T1w
   and of the preprocessed input).
3. No near-identical image under two IDs: the correlation of the downsampled preprocessed
   images after removing the cohort's mean image. Registered brains all look alike (raw
   correlations are high), but their deviations from the mean are subject-specific; a renamed
   or re-encoded copy of a scan keeps r close to 1. ClinicaDL admits it cannot catch this.
4. Site as a leaking feature: how well site/scanner metadata alone predict the target
   (cross-validated ROC-AUC or R^2); far above chance means a model can learn the site.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, r2_score, roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.preprocessing import OneHotEncoder

from . import near_duplicates
from .task import Task

LOGGER = logging.getLogger(__name__)

#: Residual correlation above which two images are taken for the same scan.
NEAR_DUPLICATE_R = 0.95
#: Cross-validated ROC-AUC (or R^2, or balanced accuracy above chance + 0.2) of site alone that warns.
SITE_AUC_WARN = 0.7
SITE_R2_WARN = 0.1
#: Columns that describe where or on what an image was acquired.
SITE_COLUMNS = ("site", "scanner", "center", "centre", "manufacturer", "field_strength", "session_site")


def check_record(name: str, problems: list[str], *, severity: str = "fail", detail: str = "") -> dict[str, Any]:
    """A leakage check as reports and ``results.json`` show it: ``severity`` when there are ``problems``."""
    return _check(name, problems, severity=severity, detail=detail)


def _check(name: str, problems: list[str], *, severity: str = "fail", detail: str = "") -> dict[str, Any]:
    result = severity if problems else "pass"
    css = {"pass": "pass", "fail": "fail", "warning": "warn"}[result]
    return {"name": name, "result": result, "css": css, "details": problems, "summary": detail}


def split_of(splits: pd.DataFrame) -> dict[str, dict[int, str]]:
    """participant -> fold -> split ('test' under fold -1)."""
    out: dict[str, dict[int, str]] = {}
    pid: str
    for pid, split, fold in splits[["participant_id", "split", "fold"]].itertuples(index=False):
        out.setdefault(pid, {})[-1 if pd.isna(fold) else int(fold)] = split
    return out


def _separated(a: str, b: str, membership: dict[str, dict[int, str]]) -> bool:
    """Whether two participants ever sit on different sides of a split (a leak if they are one person)."""
    ma, mb = membership.get(a, {}), membership.get(b, {})
    if ("test" in ma.values()) != ("test" in mb.values()):
        return True
    return any(ma.get(fold) != mb.get(fold) for fold in set(ma) | set(mb) if fold >= 0)


def check_subject_overlap(splits: pd.DataFrame) -> dict[str, Any]:
    problems = []
    test = set(splits.loc[splits["split"] == "test", "participant_id"])
    for fold, rows in splits.dropna(subset=["fold"]).groupby("fold"):
        train = set(rows.loc[rows["split"] == "train", "participant_id"])
        val = set(rows.loc[rows["split"] == "validation", "participant_id"])
        problems += [f"fold {fold}: {p} in train and validation" for p in sorted(train & val)]
        problems += [f"fold {fold}: {p} in development and test" for p in sorted((train | val) & test)]
    return _check("No participant in two splits", problems, detail=f"{splits['participant_id'].nunique()} subjects")


def check_identical_images(images: pd.DataFrame, splits: pd.DataFrame) -> dict[str, Any]:
    membership = split_of(splits)
    problems = []
    for column in ("data_sha256", "input_sha256"):
        if column not in images.columns:
            continue
        hashed = images[images[column].astype(bool)]
        for digest, group in hashed[hashed.duplicated(column, keep=False)].groupby(column):
            owners = sorted(set(group["participant_id"]))
            for a, b in itertools.combinations(owners, 2):
                where = "across splits" if _separated(a, b, membership) else "within one split"
                problems.append(f"{a} and {b} have identical {column[:-7]} ({digest[:12]}…), {where}")
    across = any("across splits" in p for p in problems)
    return _check(
        "No identical image under two participant IDs across splits",
        sorted(set(problems)),
        severity="fail" if across else "warning",
        detail="IDs sharing an identical image are kept in one split",
    )


def check_near_duplicates(
    images: pd.DataFrame, arrays: list[np.ndarray], splits: pd.DataFrame, *, threshold: float = NEAR_DUPLICATE_R,
    exact_max_images: int = near_duplicates.EXACT_MAX_IMAGES,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The check, and the most correlated pairs of images of different subjects (for the report)."""
    membership = split_of(splits)
    ids = images["participant_id"].tolist()
    sources = images["source"].tolist()
    found = near_duplicates.scan(arrays, ids, threshold=threshold, exact_max_images=exact_max_images)
    problems = []
    for r, i, j in found.pairs:
        where = "across splits" if _separated(ids[i], ids[j], membership) else "within one split"
        problems.append(f"{sources[i]} ~ {sources[j]}: r = {r:.3f}, {where}")
    severity = "fail" if any("across splits" in p for p in problems) else "warning"
    top = [{"a": sources[i], "b": sources[j], "r": round(r, 4)} for r, i, j in found.top]
    how = (f"; compared on {near_duplicates.PROJECTED_DIMS}-number projections, every pair near the threshold "
           "checked exactly" if found.projected else "")  # fmt: skip
    detail = (f"residual r > {threshold} flags a pair; median over {found.n_pairs} pairs of subjects: "
              f"{found.median:.3f}{how}")  # fmt: skip
    return _check("No near-identical image under two participant IDs", problems, severity=severity, detail=detail), top


def check_site_leakage(subjects: pd.DataFrame, *, task: Task, seed: int) -> dict[str, Any]:
    """How well site/scanner columns alone predict the target, cross-validated over subjects."""
    columns = [c for c in SITE_COLUMNS if c in subjects.columns and subjects[c].nunique(dropna=False) > 1]
    name = "Site/scanner does not predict the target"
    if not columns:
        return _check(name, [], detail="no site or scanner column varies: nothing to learn from")
    features = OneHotEncoder(handle_unknown="ignore").fit_transform(subjects[columns].astype(str))
    y = subjects["y"].to_numpy()
    n_splits = 5
    if task.discrete:
        counts = np.unique(y, return_counts=True)[1]
        n_splits = int(min(n_splits, counts.min()))
        if n_splits < 2:
            return _check(name, [], detail="too few subjects per class to cross-validate")
        cv: Any = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
        model: Any = LogisticRegression(max_iter=1000)
        if len(counts) == 2:
            scores = cross_val_predict(model, features, y, cv=cv, method="predict_proba")[:, 1]
            value, label, warn = float(roc_auc_score(y, scores)), "ROC-AUC", SITE_AUC_WARN
        else:
            predicted = cross_val_predict(model, features, y, cv=cv)
            value, label = float(balanced_accuracy_score(y, predicted)), "balanced accuracy"
            warn = 1 / len(counts) + 0.2
    else:
        cv = KFold(min(n_splits, len(y)), shuffle=True, random_state=seed)
        predicted = cross_val_predict(Ridge(alpha=1.0), features, y, cv=cv)
        value, label, warn = float(r2_score(y, predicted)), "R^2", SITE_R2_WARN
    detail = f"{label} of predicting the target from {', '.join(columns)} alone: {value:.2f} (warn above {warn:.2f})"
    problems = [detail + ": a model may learn the site instead of the anatomy"] if value > warn else []
    result = _check(name, problems, severity="warning", detail=detail)
    result["value"] = value
    return result
