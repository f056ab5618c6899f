"""What the group report shows of the dataset and of a learning study (data for the template)."""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from .. import derivatives
from ..kinds import DEFAULT_CHANNELS, REFERENCE_KIND
from . import learning as figures
from .group_tables import capped


class Task(Protocol):
    """What the report asks of a learning task (the group level hands the task object in; reports never look
    one up)."""

    discrete: bool

    def evaluation_figure(self, evaluation: dict[str, Any], classes: Sequence[str], table: pd.DataFrame) -> bytes: ...

    def chance_level(self, n_classes: int) -> tuple[str, float] | None: ...

LOGGER = logging.getLogger(__name__)

#: participants.tsv columns summarised in the Dataset section when present.
_SUMMARY_COLUMNS = ("diagnosis", "group", "site", "sex", "scanner", "manufacturer")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def dataset_summary(manifest: pd.DataFrame, target: str | None) -> dict[str, Any]:
    """Counts of subjects by target, site, sex (...), and their ages, from the manifest."""
    subjects = manifest.drop_duplicates("participant_id")
    columns = [c for c in dict.fromkeys([*([target] if target else []), *_SUMMARY_COLUMNS]) if c in subjects.columns]
    counts: dict[str, dict[str, int]] = {}
    for column in columns:
        values = subjects[column]
        if pd.to_numeric(values, errors="coerce").notna().all() and values.nunique() > 6:
            continue  # numeric: summarised as a distribution
        counts[column] = {
            str(k): int(v) for k, v in values.fillna("n/a").astype(str).value_counts().sort_index().items()
        }
    age = pd.to_numeric(subjects["age"], errors="coerce").dropna().tolist() if "age" in subjects.columns else None
    numeric = {}
    for column in [c for c in columns if c not in counts] + (["age"] if age else []):
        values = pd.to_numeric(subjects[column], errors="coerce").dropna()
        numeric[column] = {"mean": float(values.mean()), "sd": float(values.std()), "min": float(values.min()),
                           "max": float(values.max()), "n": len(values)}  # fmt: skip
    figure = figures.dataset_counts(counts, age) if counts or age else None
    return {
        "n_subjects": len(subjects),
        "n_images": len(manifest),
        "counts": counts,
        "numeric": numeric,
        "figure": _data_uri(figure) if figure else None,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _metric_rows(evaluation: dict[str, Any]) -> list[dict[str, str]]:
    ci = evaluation.get("ci", {})
    rows = []
    for name, value in evaluation["metrics"].items():
        low, high = ci.get(name, (None, None))
        rows.append({"metric": name, "value": _fmt(value), "ci": f"{_fmt(low)} – {_fmt(high)}" if ci else ""})
    return rows


def _fold_table(results: dict[str, Any]) -> dict[str, Any]:
    names = list(results["validation_summary"])
    rows = []
    for fold in results["folds"]:
        rows.append(
            {
                "fold": fold["fold"],
                "epochs": len(fold["history"]),
                "stopped_early": fold["stopped_early"],
                "best": ", ".join(f"{k} @ {v['epoch']}" for k, v in fold["best"].items()),
                "threshold": _fmt(fold["threshold"]),
                "outlook": (fold.get("outlook") or {}).get("text", ""),
                "validation": [_fmt(fold["validation"]["metrics"].get(n)) for n in names],
                "test": [_fmt(fold["test"]["metrics"].get(n)) for n in names],
            }
        )

    def mean_sd(summary: dict[str, dict[str, float]]) -> list[str]:
        return [f"{_fmt(summary[n]['mean'])} ± {_fmt(summary[n]['std'])}" for n in names]

    summary = {"validation": mean_sd(results["validation_summary"]), "test": mean_sd(results["test_fold_summary"])}
    return {"metrics": names, "rows": rows, "summary": summary}


def _worst(results: dict[str, Any], output_dir: Path) -> list[dict[str, Any]]:
    resolution = float(results.get("model_resolution", 2.0))
    cases = []
    for case in results["worst"]:
        case = dict(case)
        path = derivatives.named_path(output_dir, case["source"], "preproc_model", model_resolution=resolution)
        case["figure"] = None
        if path.exists():
            try:
                import nibabel as nib

                case["figure"] = _data_uri(figures.orthogonal_slices(np.asanyarray(nib.load(path).dataobj)))  # type: ignore[attr-defined]
            except Exception as exc:  # a figure must not sink the report
                LOGGER.warning("Could not draw %s: %s", path, exc)
        case["error"] = _fmt(case["error"])
        case["predicted"] = _fmt(case["predicted"], 2) if isinstance(case["predicted"], float) else case["predicted"]
        cases.append(case)
    return cases


def _previews(results: dict[str, Any], output_dir: Path) -> list[dict[str, Any]]:
    """The worst test cases of a segmentation, drawn at training time (input, reference, prediction)."""
    out = []
    for case in results.get("worst_previews", []):
        path = Path(case["figure"])
        if not path.is_absolute():
            path = output_dir / path
        figure = _data_uri(path.read_bytes()) if path.exists() else None
        out.append({"source": case["source"], "dice": _fmt(case["dice"]), "figure": figure})
    return out


def _results_file(results: dict[str, Any], output_dir: Path) -> str:
    """Where the study's ``results.json`` lies, relative to OUTPUT_DIR."""
    path = derivatives.results_path(output_dir, results["target"], results["architecture"],
                                    results.get("inputs") or DEFAULT_CHANNELS)  # fmt: skip
    return path.relative_to(output_dir).as_posix()


def learning_context(results: dict[str, Any], output_dir: Path, task: Task) -> dict[str, Any]:
    """Figures and tables of a study's ``results.json`` (of ``task``) for the group report."""
    test = results["test"]
    # a nested cross-validation's: every participant's pooled prediction; else the package's test set
    predictions = pd.read_csv(output_dir / results["predictions_file"] if results.get("predictions_file") else
                              output_dir / results["package"] / derivatives.STUDY_OUTPUTS["predictions"], sep="\t")
    ensemble = predictions[(predictions["split"] == "test") & (predictions["fold"].astype(str) == "ensemble")]
    cases_path = output_dir / results["package"] / derivatives.STUDY_OUTPUTS["case_scores"]
    if cases_path.exists():  # voxel-wise tasks: the case-wise scores in each T1w's grid
        cases = pd.read_csv(cases_path, sep="\t")
        ensemble = cases[(cases["split"] == "test") & (cases["fold"].astype(str) == "ensemble")]
        native = (ensemble["space"] == REFERENCE_KIND).any()  # each image's own grid, when scored there
        ensemble = ensemble[ensemble["space"] == (REFERENCE_KIND if native else "template")]
    evaluation_figure = task.evaluation_figure(test, results["classes"], ensemble)
    return {
        **{k: results[k] for k in ("target", "task", "classes", "positive_class", "architecture", "package")},
        "content_sha256": results["content_sha256"],
        "n_images": results["n_images"],
        "n_subjects": results["n_subjects"],
        "excluded": capped(results["excluded"], f"{_results_file(results, output_dir)}, under excluded"),
        "splits": results["splits"],
        "splits_reused": results["splits_reused"],
        "checks": results["checks"],
        "near_pairs": results["near_pairs"],
        "curves": _data_uri(figures.training_curves([f["history"] for f in results["folds"]])),
        "folds": _fold_table(results),
        "test_metrics": _metric_rows(test),
        "test_n": test["n"],
        "test_subjects": test["n_subjects"],
        "threshold": _fmt(results["threshold"]),
        "evaluation_figure": _data_uri(evaluation_figure),
        "worst": _worst(results, output_dir),
        "threshold_used": task.discrete,
        "native_metrics": _metric_rows(results["test_native"]) if results.get("test_native") else [],
        "native_sd": results.get("test_native", {}).get("sd"),
        "test_sd": test.get("sd"),
        "previews": _previews(results, output_dir),
        "device": results["device"],
        "wall_time_s": results["wall_time_s"],
        "baseline": _baseline(results),
        "volumes_baseline": _baseline(results, "volumes_baseline"),
        "volumes_baseline_note": results.get("volumes_baseline_note"),
        "permutation": _permutation(results),
        "search": _search(results),
        "transfer": results.get("transfer"),
        "distribution": _distribution(results.get("distribution")),
        "nested": _nested(results.get("nested")),
        "learning_curve": _learning_curve(results),
        "design": results.get("design"),
        "chance": against_chance(results, task),
    }


#: The models a study scores on its test participants, by the key of their evaluation in results.json.
_MODELS = (("the network", None), ("the linear model on the same inputs", "baseline"),
           ("the linear model on regional volumes", "volumes_baseline"))  # fmt: skip


def against_chance(results: dict[str, Any], task: Task) -> dict[str, Any] | None:
    """Whether each model is distinguishable from chance: its chance metric's 95% CI against the task's chance level
    (above it, holding it, or below), and the permutation control's score when it ran; None for a task without one.

    >>> class T:
    ...     def chance_level(self, n): return ("roc_auc", 0.5)
    >>> r = {"classes": ["CN", "AD"], "test": {"metrics": {"roc_auc": 0.44}, "ci": {"roc_auc": [0.13, 0.78]}}}
    >>> against_chance(r, T())["text"]
    'Against chance (roc_auc 0.5): the network scored 0.440 (95% CI 0.130 to 0.780): not distinguishable from chance.'
    """
    found = task.chance_level(len(results.get("classes") or []))
    if found is None:
        return None
    metric, level = found
    rows = []
    for name, key in _MODELS:
        evaluation = results["test"] if key is None else (results.get(key) or {}).get("test")
        value = ((evaluation or {}).get("metrics") or {}).get(metric)
        if value is None:
            continue
        ci = ((evaluation or {}).get("ci") or {}).get(metric) or (None, None)
        low, high = (float(v) if isinstance(v, (int, float)) else math.nan for v in ci)  # JSON writes NaN as null
        bounded = math.isfinite(low) and math.isfinite(high)
        if not bounded:
            verdict = "no interval on this test set"
        elif low > level:
            verdict = "distinguishable from chance (above it)"
        elif high < level:
            verdict = "worse than chance"
        else:
            verdict = "not distinguishable from chance"
        interval = f" (95% CI {low:.3f} to {high:.3f})" if bounded else ""
        rows.append({"model": name, "verdict": verdict, "text": f"{name} scored {value:.3f}{interval}: {verdict}"})
    if not rows:
        return None
    text = f"Against chance ({metric} {level:g}): " + "; ".join(r["text"] for r in rows) + "."
    control = results.get("permutation_control")
    shuffled = ((control or {}).get("deep") or {}).get("metrics", {}).get(metric)
    if shuffled is not None:
        text += f" The same study on shuffled targets (permutation control) scored {shuffled:.3f}."
    return {"metric": metric, "level": level, "rows": rows, "text": text}


def _learning_curve(results: dict[str, Any]) -> dict[str, Any] | None:
    """The linear models' learning curves (:mod:`pipeline.learn.curve`), the network's score beside them, what the
    curve says."""
    names = {"baseline": "linear, same inputs", "volumes_baseline": "linear, regional volumes"}
    curves = {names[k]: results[k]["learning_curve"] for k in names if (results.get(k) or {}).get("learning_curve")}
    if not curves:
        return None
    first = next(iter(curves.values()))
    metric, full = first[0]["metric"], first[-1]
    deep = {"n_train": full["n_train"], "value": results["test"]["metrics"].get(metric),
            "ci": results["test"].get("ci", {}).get(metric, [float("nan")] * 2)}  # fmt: skip
    chance = 0.5 if metric == "roc_auc" else None
    said = next(results[k].get("learning_curve_outlook") for k in names if (results.get(k) or {}).get("learning_curve"))
    return {
        "figure": _data_uri(figures.learning_curves(curves, deep if deep["value"] is not None else None, chance)),
        "text": said["text"] if said else "Too few training participants of a class for the smaller points.",
        "rows": [{"model": name, "points": ", ".join(f"{p['n_train']:.0f}: {_fmt(p['value'])}" for p in points)}
                 for name, points in curves.items()],
        "metric": metric,
    }  # fmt: skip


def _nested(nested: dict[str, Any] | None) -> dict[str, Any] | None:
    """The outer folds of a nested cross-validation: each one's test scores, their mean and SD."""
    if not nested:
        return None
    metrics = list(nested["spread"])
    return {
        **{k: nested[k] for k in ("outer_folds", "n_tested", "n_images", "threshold_rule", "model_for_later_use")},
        "metrics": metrics,
        "rows": [{"outer_fold": r["outer_fold"], "n_test": r["n_test"], "package": r["package"],
                  "scores": [_fmt(r["metrics"].get(m)) for m in metrics]} for r in nested["per_outer_fold"]],
        "spread": [f"{_fmt(nested['spread'][m]['mean'])} ± {_fmt(nested['spread'][m]['std'])}" for m in metrics],
    }  # fmt: skip


def _distribution(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the package records to tell an unfamiliar image at inference (:mod:`pipeline.learn.ood`)."""
    if not entry:
        return None
    calibration = entry["calibration"]
    flagged = calibration.get("validation_flagged")
    return {
        "features": entry["features"],
        "n_train": [f["n_train"] for f in entry["folds"]],
        "threshold": _fmt(calibration["threshold"], 2),
        "rule": calibration["rule"],
        "calibrated_on": calibration["calibrated_on"],
        "n_validation": calibration["n_validation"],
        "validation_flagged": "n/a" if flagged is None else f"{flagged:.0%}",
        "metrics": [{"metric": k, "range": f"{_fmt(v['min'])} – {_fmt(v['max'])}",
                     "allowed": f"{_fmt(v['low'])} – {_fmt(v['high'])}"} for k, v in entry["metric_ranges"].items()],
        "metric_rule": entry["metric_rule"],
    }  # fmt: skip


def _baseline(results: dict[str, Any], key: str = "baseline") -> dict[str, Any] | None:
    """A linear baseline beside the network (``baseline``: on its voxels; ``volumes_baseline``: on the regional
    volumes): both test scores with their intervals, the paired difference."""
    linear = results.get(key)
    if not linear:
        return None
    deep, headline = results["test"], linear["headline"]
    rows = []
    for name, comparison in linear["comparison"].items():
        low, high = comparison["ci"]
        deep_ci = deep.get("ci", {}).get(name, (None, None))
        base_ci = linear["test"].get("ci", {}).get(name, (None, None))
        rows.append({
            "metric": name, "headline": name == headline,
            "deep": _fmt(deep["metrics"].get(name)), "deep_ci": f"{_fmt(deep_ci[0])} – {_fmt(deep_ci[1])}",
            "baseline": _fmt(linear["test"]["metrics"].get(name)),
            "baseline_ci": f"{_fmt(base_ci[0])} – {_fmt(base_ci[1])}",
            "difference": _fmt(comparison["difference"]), "difference_ci": f"{_fmt(low)} – {_fmt(high)}",
        })  # fmt: skip
    share = linear["wall_time_s"] / results["wall_time_s"] if results.get("wall_time_s") else None
    return {
        "model": linear["model"],
        "features": linear.get("features"),
        "predictions": linear.get("predictions", "baseline_predictions.tsv"),
        "selection": linear["selection"],
        "strengths": ", ".join(_strength(f) for f in linear["folds"]),
        "rows": rows,
        "verdict": linear["verdict"],
        "time": f"{linear['wall_time_s']:.1f} s" + (f" ({share:.0%} of the study)" if share else ""),
    }


def _strength(fold: dict[str, Any]) -> str:
    note = "" if fold["inner_folds"] else " (no inner CV: too few participants)"
    return f"fold {fold['fold']}: {fold['strength']:g}{note}"


def _permutation(results: dict[str, Any]) -> dict[str, Any] | None:
    control = results.get("permutation_control")
    if not control:
        return None
    headline = control["headline"]

    def score(evaluation: dict[str, Any] | None) -> dict[str, str] | None:
        if not evaluation:
            return None
        low, high = evaluation.get("ci", {}).get(headline, (None, None))
        return {"value": _fmt(evaluation["metrics"].get(headline)), "ci": f"{_fmt(low)} – {_fmt(high)}"}

    return {"metric": headline, "targets": control["targets"], "deep": score(control["deep"]),
            "baseline": score(control.get("baseline")), "real": score(results["test"])}  # fmt: skip


def _search(results: dict[str, Any]) -> dict[str, Any] | None:
    searched = results.get("search")
    if not searched:
        return None
    names = [d["name"] for d in searched["space"]]
    rows = [{"trial": t["trial"], "best": t["trial"] == searched["best"],
             "values": [f"{t['values'][n]:.3g}" if n in searched["searched"] else "n/a" for n in names],
             "folds": ", ".join(_fmt(v) for v in t["fold_scores"]), "score": _fmt(t["score"])}
            for t in sorted(searched["trials"], key=lambda t: t["trial"])]  # fmt: skip
    space = [f"{d['name']} {d['low']:g}–{d['high']:g}{' (log)' if d['log'] else ''}" for d in searched["space"]]
    return {"n": searched["n_trials"], "metric": searched["metric"], "names": names, "rows": rows,
            "best": searched["best"], "space": ", ".join(space), "scored_on": searched["scored_on"]}  # fmt: skip


def external_context(results: dict[str, Any], task: Task) -> dict[str, Any]:
    """What the group report shows of an external evaluation (``group --model``) of a model of ``task``."""
    evaluation = results.get("evaluation")

    figure = None
    if evaluation:
        table = pd.DataFrame({"y": results["truth"] or [], "predicted": results["predicted"] or []})
        figure = _data_uri(task.evaluation_figure(evaluation, results["classes"], table))
    training_test = results["training"]["test"]
    return {
        **{k: results[k] for k in ("models", "ensemble_id", "task", "target", "classes", "positive_class")},
        "n_predicted": results["n_predicted"],
        "n_evaluated": results["n_evaluated"],
        "skipped": results["skipped"],
        "excluded": capped(results["excluded"], f"{derivatives.GROUP_OUTPUTS['external_evaluation']}, under excluded"),
        "seen_in_training": results["seen_in_training"],
        "metrics": _metric_rows(evaluation) if evaluation else [],
        "training_metrics": {row["metric"]: row for row in _metric_rows(training_test)},
        "training_subjects": results["training"]["n_subjects"],
        "figure": figure,
        "threshold_used": task.discrete,
        "worst": [{"source": w["source"], "dice": _fmt(w["dice"])} for w in results.get("worst", [])],
        "out_of_distribution": results.get("out_of_distribution", []),
        "distribution_checked": results.get("distribution_checked", 0),
        "by_distribution": results.get("by_distribution"),
    }
