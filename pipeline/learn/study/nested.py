"""Nested cross-validation (``--outer-folds K``): every participant tested once.

Tens of participants make one held-out test set of a handful decide nothing (a ROC-AUC's interval spans ±0.3). So
the subjects are parted into K outer folds (stratified, seeded, all sessions of a subject together); for each outer
fold the whole study runs as it would with one test set (:func:`pipeline.learn.study.run_study`): the other
participants make its inner train/validation folds (thresholds, early stopping and the baselines' regularisation
chosen on them only), and its outer fold is its test set. The nested assembly then pools the K test sets: a
prediction for every participant, metrics with bootstrap intervals over all of them, the network against each
baseline paired over all of them, and the spread of each metric over the outer folds.

An outer fold runs in ``learn/target-<t>/outer-<k>/`` (its splits, its folds, its package: one member of an ensemble
for later use); ``--outer-fold K`` runs one of them (a SLURM array task), and a run without it reuses the finished
ones (same settings) and assembles. Pooled threshold-dependent metrics use the mean of the outer folds' thresholds
(each chosen on its own validation folds); ROC-AUC and the value metrics do not depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ... import derivatives
from ...errors import InputDataError, UsageError
from .. import baseline, curve, evaluate
from ..cohort import usable_images
from ..registry import get_task
from ..splits import EVERYONE
from ..task import Task
from .assembly import OUTER_ROWS
from .run import run_study
from .settings import StudySettings, study_run_dir
from .stages import study_task

LOGGER = logging.getLogger(__name__)
#: What an outer fold writes when it has finished, beside its results: the settings it ran with.
OUTER_RECORD = "outer.json"
#: The pooled predictions of every participant (the nested evaluation's), in the study's folder.
NESTED_PREDICTIONS = "nested_predictions.tsv"


#: Fewer participants than this: every participant tested once by default (nested cross-validation); from this many,
#: one held-out test set (of ``--test-size``: 60 participants or more) decides well enough and costs a K-th.
NESTED_BELOW = 300
#: The outer folds of the default nested cross-validation (fewer where a class is too rare).
DEFAULT_OUTER_FOLDS = 5


def auto_outer_folds(n_subjects: int, smallest_class: int | None, *, n_folds: int, test_size: float,
                     refused: str = "") -> tuple[int, str]:  # fmt: skip
    """The default evaluation design of a cohort: the number of outer folds (0: one held-out test set) and why.
    ``smallest_class``: the rarest class's participants (None for values); ``refused``: what rules nested
    cross-validation out for this study (a segmentation, ``--fold``, ``--search``), if anything.

    >>> auto_outer_folds(80, 36, n_folds=5, test_size=0.2)[0], auto_outer_folds(400, 150, n_folds=5, test_size=0.2)[0]
    (5, 0)
    >>> auto_outer_folds(12, 4, n_folds=2, test_size=0.2)[0], auto_outer_folds(12, 2, n_folds=2, test_size=0.2)[0]
    (4, 0)
    """
    n_test = max(1, round(n_subjects * test_size))
    spread = (f"a ROC-AUC's or a correlation's 95% interval on {n_test} test participants spans roughly "
              f"±{1 / n_test**0.5:.2f}")  # fmt: skip
    if refused:
        return 0, (f"one held-out test set: {refused} (nested cross-validation, the default below {NESTED_BELOW} "
                   "participants, does not combine with it)")  # fmt: skip
    if n_subjects >= NESTED_BELOW:
        return 0, (f"one held-out test set: {n_subjects} participants (from {NESTED_BELOW} on, a test set of "
                   f"{n_test} decides well enough: {spread}; --outer-folds K tests everyone)")  # fmt: skip
    k = DEFAULT_OUTER_FOLDS if smallest_class is None else min(DEFAULT_OUTER_FOLDS, smallest_class)
    # every outer fold's development participants must hold the inner folds: its rarest class in each of them
    while smallest_class is not None and k >= 3 and smallest_class - -(-smallest_class // k) < max(n_folds, 2) + 1:
        k -= 1
    if k < 3:
        return 0, (f"one held-out test set: the rarest class has {smallest_class} participant(s), too few for three "
                   f"outer folds of {max(n_folds, 2)} inner folds each")  # fmt: skip
    return k, (f"every participant tested once ({k} outer folds): {n_subjects} participants, fewer than "
               f"{NESTED_BELOW}, where one held-out test set would decide little ({spread}); --outer-folds 0 for one "
               "test set")  # fmt: skip


def resolve_design(manifest: pd.DataFrame, *, settings: StudySettings, requested: int | None, output_dir: Path,
                   qc: pd.DataFrame | None) -> StudySettings:  # fmt: skip
    """The study's settings with its evaluation design decided: ``--outer-folds`` as ``requested``, else
    :func:`auto_outer_folds` on the cohort's participants (counted per class before any image is read)."""
    if requested is not None:
        k, chosen = requested, "--outer-folds"
        why = f"--outer-folds {k}" + (": every participant tested once" if k else ": one held-out test set")
    else:
        chosen = "default"
        task = study_task(manifest, output_dir=output_dir, qc=qc, settings=settings)
        refused = ("a segmentation (label maps)" if task.learns_labels else "--fold" if settings.fold
                   else "--search" if settings.search else "")  # fmt: skip
        subjects, smallest = pd.Series(dtype=object), None
        if not refused:  # a segmentation's target is its label maps: not a column to count
            table, _ = usable_images(manifest, output_dir=output_dir, target=settings.target, qc=qc,
                                     resolution_mm=settings.model_resolution, inputs=settings.inputs,
                                     exclude_qc_outliers=settings.exclude_qc_outliers,
                                     include_failed_qc=settings.include_failed_qc)  # fmt: skip
            subjects = table.groupby("participant_id")["target"].first()
            smallest = int(subjects.value_counts().min()) if task.discrete and len(subjects) else None
        k, why = auto_outer_folds(len(subjects), smallest, n_folds=settings.split.n_folds,
                                  test_size=settings.split.test_size, refused=refused)  # fmt: skip
        LOGGER.info("Evaluation: %s", why)
    return dataclasses.replace(
        settings, split=dataclasses.replace(settings.split, outer_folds=k),
        learning_settings={**settings.learning_settings, "outer_folds": k},
        design={**(settings.design or {}), "outer_folds": k, "chosen_by": chosen, "reason": why},
    )  # fmt: skip


def outer_settings(settings: StudySettings, k: int) -> StudySettings:
    """The study of outer fold ``k``."""
    return dataclasses.replace(settings, split=dataclasses.replace(settings.split, outer_test=k), outer_fold=())


def everyone_settings(settings: StudySettings, expected: dict[str, Any] | None = None) -> StudySettings:
    """The study that learns from every participant (inner folds only, no test set): the model for later use, its
    performance ``expected`` from the nested evaluation (recorded in its package). Its baselines and controls are the
    outer folds' (they need a test set)."""
    return dataclasses.replace(settings, split=dataclasses.replace(settings.split, outer_test=EVERYONE), outer_fold=(),
                               baseline=False, permutation_control=False, expected=expected)  # fmt: skip


def _outer_key(settings: StudySettings) -> dict[str, Any]:
    return {"learning_settings": derivatives.finite_json(settings.learning_settings), "inputs": list(settings.inputs)}


def outer_finished(output_dir: Path, settings: StudySettings, k: int) -> bool:
    """Whether outer fold ``k`` ran to its end with these settings."""
    record = study_run_dir(output_dir, outer_settings(settings, k)) / OUTER_RECORD
    try:
        return json.loads(record.read_text()) == json.loads(json.dumps(_outer_key(settings)))
    except (OSError, ValueError):
        return False


def check_nested(settings: StudySettings, task: Task | None = None) -> None:
    """What nested cross-validation does not combine with (yet), refused with what to do."""
    if settings.fold:
        raise UsageError("--fold with --outer-folds: run outer folds in parallel with --outer-fold K instead (each "
                         "trains its inner folds).")  # fmt: skip
    if settings.search:
        raise UsageError("--search with --outer-folds is not supported yet: search on one held-out test set "
                         "(--outer-folds 0), then evaluate the chosen settings with --outer-folds K.")  # fmt: skip
    if task is not None and task.learns_labels:
        raise UsageError(f"--outer-folds: nested cross-validation of {task.name} is not supported yet (whole-image "
                         "tasks only).")  # fmt: skip


def run_nested(manifest: pd.DataFrame, *, output_dir: Path, settings: StudySettings,
               **study: Any) -> dict[str, Any] | None:  # fmt: skip
    """Each outer fold's study (those of ``--outer-fold``, else every one not yet finished), then the nested
    assembly; None when ``--outer-fold`` chose some only. ``study``: :func:`run_study`'s other arguments."""
    check_nested(settings)
    k_outer = settings.split.outer_folds
    wanted = list(settings.outer_fold) or list(range(k_outer))
    for k in wanted:
        if not settings.outer_fold and outer_finished(output_dir, settings, k):
            LOGGER.info("Outer fold %d of %d: finished with these settings, reused", k, k_outer)
            continue
        LOGGER.info("Outer fold %d of %d: its participants are the test set of the study below", k, k_outer)
        sub = outer_settings(settings, k)
        run_study(manifest, output_dir=output_dir, settings=sub, **study)
        derivatives.write_json(study_run_dir(output_dir, sub) / OUTER_RECORD, _outer_key(settings))
    if settings.outer_fold:
        LOGGER.info("Ran outer fold(s) %s of %d. When every outer fold has finished, run the group level again "
                    "without --outer-fold (same options) to assemble the nested evaluation and train the model for "
                    "later use on everyone.", ", ".join(map(str, wanted)), k_outer)  # fmt: skip
        return None
    results = assemble_nested(output_dir, settings)
    LOGGER.info("The model for later use: the study again on every participant (its inner folds only)")
    expected = {**results["test"], "source": f"nested cross-validation ({k_outer} outer folds): each of the "
                f"{results['nested']['n_tested']} participants predicted by an outer fold's model that had not seen "
                "them", "baseline_verdict": (results.get("baseline") or {}).get("verdict")}  # fmt: skip
    final = run_study(manifest, output_dir=output_dir, settings=everyone_settings(settings, expected), **study)
    assert final is not None
    results.update(package=final["package"], content_sha256=final["content_sha256"])
    results["nested"]["model_for_later_use"] = (
        f"{final['package']}: the same study on every participant (its inner folds, thresholds and early stopping "
        "on them; no test set), whose expected performance on new people is this nested evaluation's"
    )
    derivatives.write_json(study_run_dir(output_dir, settings) / derivatives.STUDY_OUTPUTS["results"], results)
    return results


def _check_outer(output_dir: Path, settings: StudySettings, k: int) -> Path:
    """Outer fold ``k``'s folder; refused, saying how to run it, when it has not finished with these settings."""
    folder = study_run_dir(output_dir, outer_settings(settings, k))
    if not outer_finished(output_dir, settings, k):
        raise InputDataError(
            f"Outer fold {k} has not finished with these settings ({folder}): run the group level with --outer-fold "
            f"{k} (or without --outer-fold, to run every missing one)."
        )
    return folder


def _load_outer(output_dir: Path, settings: StudySettings, k: int) -> dict[str, Any]:
    folder = _check_outer(output_dir, settings, k)
    results = json.loads((folder / derivatives.STUDY_OUTPUTS["results"]).read_text())
    rows = pd.read_csv(folder / OUTER_ROWS, sep="\t", dtype={"participant_id": str, "session_id": str})
    outputs = {path.stem.removeprefix("outer_test_output_"): np.load(path)
               for path in sorted(folder.glob("outer_test_output_*.npy"))}  # fmt: skip
    return {"k": k, "folder": folder, "results": results, "rows": rows.assign(outer_fold=k), "outputs": outputs}


def assemble_nested(output_dir: Path, settings: StudySettings) -> dict[str, Any]:
    """The K outer folds pooled: every participant's prediction, the metrics over all of them, each baseline paired
    with the network over all of them, the spread over outer folds: the study's results (``results.json`` once the
    model for later use, on everyone, is named in it)."""
    outer = [_load_outer(output_dir, settings, k) for k in range(settings.split.outer_folds)]
    first = outer[0]["results"]
    task, classes, seed = get_task(first["task"]), first["classes"], settings.train.seed
    rows = pd.concat([o["rows"] for o in outer], ignore_index=True)
    tested = rows["participant_id"].nunique()
    if rows.groupby("participant_id")["outer_fold"].nunique().max() > 1:
        raise InputDataError("The outer folds' test sets overlap: the nested splits are inconsistent; run the group "
                             "level again with --resplit.")  # fmt: skip
    pooled = {name: np.concatenate([o["outputs"][name] for o in outer]) for name in outer[0]["outputs"]
              if all(name in o["outputs"] for o in outer)}  # fmt: skip
    thresholds = {"deep": float(np.mean([o["results"]["threshold"] for o in outer]))}
    for key in ("baseline", "volumes_baseline"):
        if key in pooled:
            thresholds[key] = float(np.mean([o["results"][key]["threshold"] for o in outer]))
    evaluation = task.evaluate_rows(rows, pooled["deep"], threshold=thresholds["deep"], seed=seed, ci=True)
    headline = task.headline_metric(len(classes))
    comparisons = {key: _pooled_baseline(task, rows, pooled, thresholds, key, outer, headline, seed)
                   for key in ("baseline", "volumes_baseline") if key in pooled}  # fmt: skip
    per_outer = [o["results"]["test"]["metrics"] for o in outer]
    run_dir = study_run_dir(output_dir, settings)
    _write_predictions(run_dir / NESTED_PREDICTIONS, task, rows, pooled["deep"], classes, thresholds["deep"])
    LOGGER.info("Nested cross-validation: %d outer folds, %d participants each tested once: %s %.3f (95%% CI %s)",
                len(outer), tested, headline, evaluation["metrics"][headline],
                " to ".join(f"{v:.3f}" for v in evaluation.get("ci", {}).get(headline, [np.nan, np.nan])))  # fmt: skip
    nested = {
        "outer_folds": len(outer),
        "n_tested": int(tested),
        "n_images": len(rows),
        "description": "every participant in one outer test fold; each outer fold's study (inner folds, thresholds, "
        "early stopping and the baselines' regularisation chosen on its own training participants) predicted its "
        "test fold once; metrics over all participants pooled, intervals by resampling participants",
        "threshold": thresholds["deep"],
        "threshold_rule": "the mean of the outer folds' thresholds (each chosen on its own validation folds)",
        "per_outer_fold": [{"outer_fold": o["k"], "n_test": int(o["rows"]["participant_id"].nunique()),
                            "metrics": o["results"]["test"]["metrics"],
                            "package": o["results"]["package"]} for o in outer],
        "spread": evaluate.fold_summary(per_outer),
        "predictions": (run_dir / NESTED_PREDICTIONS).relative_to(output_dir).as_posix(),
        "packages": [o["results"]["package"] for o in outer],
    }
    results = {
        **{k: v for k, v in first.items() if k not in ("baseline", "volumes_baseline", "permutation_control")},
        "test": evaluation,
        "threshold": thresholds["deep"],
        **comparisons,
        "nested": nested,
        "design": settings.design,
        "predictions_file": nested["predictions"],
        "n_subjects": int(tested),
        "n_images": len(rows),
    }
    return results


def _write_predictions(path: Path, task: Task, rows: pd.DataFrame, outputs: np.ndarray, classes: list[str],
                       threshold: float) -> None:  # fmt: skip
    """Every participant's pooled prediction, as the study's prediction table (split test, fold ensemble), with
    the outer fold that tested it."""
    table = rows[[c for c in task.prediction_row_columns if c in rows.columns]].copy()
    table.insert(3, "split", "test")
    table.insert(4, "fold", "ensemble")
    table = task.prediction_columns(table, outputs, classes, threshold)
    table["outer_fold"] = rows["outer_fold"].to_numpy()
    derivatives.write_text(path, table.to_csv(sep="\t", index=False, float_format="%.6g"))


def _pooled_baseline(
    task: Task, rows: pd.DataFrame, pooled: dict[str, np.ndarray], thresholds: dict[str, float], key: str,
    outer: list[dict[str, Any]], headline: str, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """A baseline's pooled test evaluation and its paired comparison with the network over every participant."""
    output, threshold = pooled[key], thresholds[key]
    truth = rows["y"].to_numpy()
    comparison = baseline.paired_difference(
        lambda idx: task.scores(truth[idx], pooled["deep"][idx], thresholds["deep"]),
        lambda idx: task.scores(truth[idx], output[idx], threshold),
        rows["participant_id"].astype(str).tolist(),
        seed=seed,
    )
    verdict = baseline.verdict(headline, comparison[headline], headline not in task.lower_is_better)
    first = outer[0]["results"][key]
    points = [{"fraction": p["fraction"], "test_output": pooled[f"{key}_curve-{p['fraction']}"],
               "n_train": float(np.mean([_curve_point(o, key, p["fraction"])["n_train"] for o in outer])),
               "threshold": float(np.mean([_curve_point(o, key, p["fraction"])["threshold"] for o in outer]))}
              for p in first.get("learning_curve", []) if f"{key}_curve-{p['fraction']}" in pooled]  # fmt: skip
    return {
        **{k: first[k] for k in ("model", "features", "selection", "grid", "predictions") if k in first},
        "folds": [f for o in outer for f in o["results"][key]["folds"]],
        "threshold": threshold,
        "test": task.evaluate_rows(rows, output, threshold=threshold, seed=seed, ci=True),
        "headline": headline,
        "comparison": comparison,
        "verdict": verdict,
        "wall_time_s": round(sum(o["results"][key]["wall_time_s"] for o in outer), 2),
        "per_outer_fold": [o["results"][key]["test"]["metrics"] for o in outer],
        "learning_curve": (scored := curve.scored(task, rows, points, headline, seed)),
        "learning_curve_outlook": curve.outlook(scored, headline not in task.lower_is_better),
    }


def _curve_point(outer: dict[str, Any], key: str, fraction: float) -> dict[str, Any]:
    return next(p for p in outer["results"][key]["learning_curve"] if p["fraction"] == fraction)
