"""Subject-level, stratified, seeded splits: a held-out test set and cross-validation folds.

All images (sessions) of a subject fall in the same split. ``splits.tsv`` holds one row per
subject and fold (``participant_id``, ``split``, ``fold``), test subjects once with fold ``n/a``;
``splits.json`` records what they were made from so a re-run reuses them, or stops when the data
changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from .. import derivatives
from ..errors import InputDataError
from .task import Task

LOGGER = logging.getLogger(__name__)

#: Quantile bins a numeric stratification column is cut into.
NUMERIC_BINS = 4
#: ``outer_test`` of the study that learns from everyone (no test set): a nested cross-validation's model for later
#: use, its performance estimated by the outer folds.
EVERYONE = -1


@dataclass(frozen=True)
class SplitSettings:
    test_size: float
    n_folds: int
    val_size: float
    seed: int
    stratify: tuple[str, ...]
    #: Nested cross-validation: the number of outer folds (0: one held-out test set of ``test_size``) ...
    outer_folds: int = 0
    #: ... and the outer fold whose participants are this study's test set (set per outer fold by the study;
    #: :data:`EVERYONE`: none, every participant in the inner folds).
    outer_test: int | None = None


def subject_table(images: pd.DataFrame, stratify: tuple[str, ...], task: Task) -> pd.DataFrame:
    """One row per subject: the target (mode or mean over sessions) and the stratification columns."""
    rows = []
    for pid, group in images.groupby("participant_id", sort=True):
        row: dict[str, Any] = {"participant_id": pid}
        row["y"] = task.subject_target(group["y"])
        for column in stratify:
            if column == "target":
                continue
            if column not in group.columns:
                raise InputDataError(
                    f"--stratify {column!r} is not a column of participants.tsv or sessions.tsv (or the manifest)."
                )
            row[column] = group[column].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def strata(subjects: pd.DataFrame, columns: tuple[str, ...], min_count: int) -> pd.Series:
    """One label per subject combining the columns; numeric ones are cut into quantile bins.

    Strata smaller than ``min_count`` are merged into one ``other`` stratum (and if that is still
    too small, into the largest one) so every stratum can be spread over the splits.

    >>> s = pd.DataFrame({"y": [0, 0, 0, 1, 1, 1], "site": ["a", "a", "b", "a", "b", "b"]})
    >>> strata(s, ("y", "site"), 2).tolist()
    ['0|a', '0|a', 'other', 'other', '1|b', '1|b']
    """
    parts = []
    for column in columns:
        values = subjects[column]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all() and numeric.nunique() > NUMERIC_BINS:
            values = pd.qcut(numeric, NUMERIC_BINS, labels=False, duplicates="drop")
        parts.append(values.astype(str))
    key = parts[0].str.cat(parts[1:], sep="|") if len(parts) > 1 else parts[0]
    counts = key.value_counts()
    key = key.where(key.map(counts) >= min_count, "other")
    counts = key.value_counts()
    if "other" in counts and counts["other"] < min_count and len(counts) > 1:
        key = key.replace("other", counts.drop("other").idxmax())
    return key.reset_index(drop=True)


def minimum_subjects(n_folds: int, test_size: float) -> int:
    """The fewest subjects that give every split at least two subjects.

    >>> minimum_subjects(5, 0.2), minimum_subjects(1, 0.2)
    (13, 6)
    """
    development = 2 * n_folds if n_folds > 1 else 4
    return max(math.ceil(development / (1 - test_size)), development + 2)


def identical_image_units(images: pd.DataFrame) -> dict[str, str]:
    """participant -> the first participant ID of its group of IDs that share an identical image.

    Such IDs are one person until shown otherwise: the splits keep them together.

    >>> df = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3"], "data_sha256": ["a", "b", "a"]})
    >>> identical_image_units(df)
    {'sub-1': 'sub-1', 'sub-2': 'sub-2', 'sub-3': 'sub-1'}
    """
    unit = {pid: pid for pid in sorted(images["participant_id"])}

    def root(pid: str) -> str:
        while unit[pid] != pid:
            pid = unit[pid]
        return pid

    for column in ("data_sha256", "input_sha256"):
        if column not in images.columns:
            continue
        hashed = images[images[column].astype(bool)]
        for _, group in hashed[hashed.duplicated(column, keep=False)].groupby(column):
            owners = sorted({root(p) for p in group["participant_id"]})
            for other in owners[1:]:
                unit[other] = owners[0]
    return {pid: root(pid) for pid in unit}


def make_splits(
    subjects: pd.DataFrame, settings: SplitSettings, *, task: Task, units: dict[str, str] | None = None
) -> pd.DataFrame:
    """The long splits table: test rows, then a train and a validation row set per fold.

    ``units`` maps participants to the unit they are split with (see :func:`identical_image_units`).
    """
    if units and any(units.get(p, p) != p for p in subjects["participant_id"]):
        representatives = subjects[[units.get(p, p) == p for p in subjects["participant_id"]]]
        table = make_splits(representatives.reset_index(drop=True), settings, task=task)
        members: dict[str, list[str]] = {}
        for pid in subjects["participant_id"]:
            members.setdefault(units.get(pid, pid), []).append(pid)
        expanded = [
            {**row, "participant_id": member}
            for row in table.to_dict(orient="records")
            for member in members[row["participant_id"]]
        ]
        out = pd.DataFrame(expanded)
        out["fold"] = out["fold"].astype("Int64")
        return out
    n = len(subjects)
    _check_size(n, settings)
    columns = tuple("y" if c == "target" else c for c in settings.stratify)
    n_splits = max(settings.n_folds, 2)
    key = strata(subjects, columns, min_count=n_splits) if columns else None
    if task.discrete:
        smallest = subjects["y"].value_counts().min()
        if smallest < n_splits + 1:
            raise InputDataError(
                f"The rarest class has {smallest} subject(s): at least {n_splits + 1} are needed to put it in the "
                f"test set and in every one of {n_splits} validation folds. Add subjects or lower --n-folds."
            )
    ids = subjects["participant_id"].to_numpy()
    dev, test = _test_split(subjects, key, settings, task)
    rows = [{"participant_id": ids[i], "split": "test", "fold": None} for i in test]
    dev_key = _usable(key, dev)
    if settings.n_folds == 1:
        train, val = train_test_split(dev, test_size=settings.val_size, random_state=settings.seed, stratify=dev_key)
        folds = [(np.sort(train), np.sort(val))]
    else:
        splitter = (
            StratifiedKFold(settings.n_folds, shuffle=True, random_state=settings.seed)
            if dev_key is not None
            else KFold(settings.n_folds, shuffle=True, random_state=settings.seed)
        )
        labels = dev_key if dev_key is not None else np.zeros(len(dev))
        folds = [(dev[a], dev[b]) for a, b in splitter.split(dev, labels)]
    for fold, (train, val) in enumerate(folds):
        rows += [{"participant_id": ids[i], "split": "train", "fold": fold} for i in train]
        rows += [{"participant_id": ids[i], "split": "validation", "fold": fold} for i in val]
    table = pd.DataFrame(rows)
    table["fold"] = table["fold"].astype("Int64")
    return table


def _check_size(n: int, settings: SplitSettings) -> None:
    test_size = settings.test_size if settings.outer_test is None else (
        0.0 if settings.outer_test == EVERYONE else 1 / settings.outer_folds)  # fmt: skip
    needed = minimum_subjects(settings.n_folds, test_size)
    if n < needed:
        raise InputDataError(
            f"{n} subject(s) are too few for a {test_size:.2g} test split and {settings.n_folds} fold(s): "
            f"at least {needed} are needed. Add subjects, or lower --n-folds (1 uses --val-size)."
        )


def _test_split(
    subjects: pd.DataFrame, key: pd.Series | None, settings: SplitSettings, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """The development and test rows: one held-out ``test_size`` split, or an outer fold's (:func:`outer_split`)."""
    index = np.arange(len(subjects))
    if settings.outer_test == EVERYONE:
        return index, index[:0]
    if settings.outer_test is not None:
        return outer_split(subjects, key, settings, task)
    dev, test = train_test_split(
        index, test_size=settings.test_size, random_state=settings.seed, stratify=_usable(key, index)
    )
    return np.sort(dev), np.sort(test)


def outer_split(
    subjects: pd.DataFrame, key: pd.Series | None, settings: SplitSettings, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """The development and test rows of outer fold ``settings.outer_test`` of ``settings.outer_folds`` (stratified
    like the test split, same seed: every outer fold of one study partitions the same subjects). A class with fewer
    subjects than outer folds is refused: some outer test set would miss it.

    >>> from pipeline.learn.registry import get_task
    >>> s = pd.DataFrame({"participant_id": [f"s{i}" for i in range(12)], "y": [0, 1] * 6})
    >>> settings = SplitSettings(0.2, 2, 0.2, 0, ("target",), outer_folds=3, outer_test=0)
    >>> tests = [outer_split(s, s["y"].astype(str), SplitSettings(**{**settings.__dict__, "outer_test": k}),
    ...                      get_task("classification"))[1] for k in range(3)]
    >>> sorted(np.concatenate(tests).tolist()) == list(range(12)), [len(t) for t in tests]
    (True, [4, 4, 4])
    """
    k = settings.outer_folds
    if task.discrete:
        smallest = int(subjects["y"].value_counts().min())
        if smallest < k:
            raise InputDataError(
                f"--outer-folds {k}: the rarest class has {smallest} subject(s), fewer than the outer folds (each "
                f"outer test set needs one). Use --outer-folds {max(2, smallest)} or fewer."
            )
    if len(subjects) < k:
        raise InputDataError(f"--outer-folds {k}: only {len(subjects)} subject(s).")
    index = np.arange(len(subjects))
    labels = _usable(key, index)
    if labels is not None and np.unique(labels, return_counts=True)[1].max() < k:
        labels = None  # every stratum smaller than the folds (a handful of participants): no stratification possible
    splitter = (StratifiedKFold(k, shuffle=True, random_state=settings.seed) if labels is not None
                else KFold(k, shuffle=True, random_state=settings.seed))  # fmt: skip
    parts = list(splitter.split(index, labels if labels is not None else np.zeros(len(index))))
    dev, test = parts[int(settings.outer_test or 0)]
    return np.sort(dev), np.sort(test)


def _usable(key: pd.Series | None, index: np.ndarray) -> np.ndarray | None:
    """The stratification labels of ``index``, or None when some stratum has a single member."""
    if key is None:
        return None
    labels = key.to_numpy()[index]
    _, counts = np.unique(labels, return_counts=True)
    return labels if counts.min() >= 2 else None


def fingerprint(images: pd.DataFrame) -> str:
    """sha256 over (participant, image, voxel-data hash) of the cohort: changes when the data change."""
    rows = sorted(zip(images["participant_id"], images["source"], images["data_sha256"], strict=True))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def save_splits(folder: Path, table: pd.DataFrame, *, settings: SplitSettings, data_fingerprint: str) -> None:
    derivatives.write_text(folder / "splits.tsv", table.to_csv(sep="\t", index=False, na_rep="n/a"))
    derivatives.write_json(
        folder / "splits.json",
        {
            "Description": "Subject-level splits: one row per subject and fold; test subjects once (fold n/a)",
            "settings": settings.__dict__,
            "data_fingerprint": data_fingerprint,
            "n_subjects": int(table["participant_id"].nunique()),
        },
    )


def load_or_make_splits(
    folder: Path,
    subjects: pd.DataFrame,
    settings: SplitSettings,
    *,
    task: Task,
    data_fingerprint: str,
    resplit: bool,
    units: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, bool]:
    """Reuse ``splits.tsv`` when it was made from the same data and settings; returns (table, reused)."""
    record_path = folder / "splits.json"
    if (folder / "splits.tsv").exists() and record_path.exists() and not resplit:
        record = json.loads(record_path.read_text())
        changes = []
        if record.get("data_fingerprint") != data_fingerprint:
            changes.append("the images or subjects changed")
        old = record.get("settings", {})
        defaults = {f.name: f.default for f in dataclasses.fields(SplitSettings)}
        for key, value in settings.__dict__.items():
            if key not in old and value == defaults.get(key):  # splits made before the setting existed
                continue
            if _jsonable(old.get(key)) != _jsonable(value):
                changes.append(f"{key}: {old.get(key)!r} -> {value!r}")
        if changes:
            raise InputDataError(
                f"The splits in {folder / 'splits.tsv'} were made from other data or settings "
                f"({'; '.join(changes)}). Re-using them would mix up training and test subjects; "
                "pass --resplit to make new splits (the test set changes), or restore the data."
            )
        table = pd.read_csv(folder / "splits.tsv", sep="\t", dtype={"participant_id": str})
        table["fold"] = table["fold"].astype("Int64")
        return table, True
    table = make_splits(subjects, settings, task=task, units=units)
    save_splits(folder, table, settings=settings, data_fingerprint=data_fingerprint)
    return table, False


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def fold_members(splits: pd.DataFrame, fold: int) -> dict[str, list[str]]:
    """Participant IDs of train, validation (of ``fold``) and test."""
    in_fold = splits[splits["fold"] == fold]
    return {
        "train": sorted(in_fold.loc[in_fold["split"] == "train", "participant_id"]),
        "validation": sorted(in_fold.loc[in_fold["split"] == "validation", "participant_id"]),
        "test": sorted(splits.loc[splits["split"] == "test", "participant_id"]),
    }


def n_folds_of(splits: pd.DataFrame) -> int:
    return int(splits["fold"].dropna().nunique())
