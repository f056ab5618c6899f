"""A study's assembly once its folds are trained: the ensemble on the test set, the linear baseline and the
controls beside it, the distribution check's record, the package and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ... import derivatives
from ...bids.audit import sha256_file
from ...qc import load_qc
from .. import baseline, controls, distributed, evaluate, ood, transfer, volumes
from ..data import derived_seed
from ..device import determinism_record
from ..models import ModelConfig
from ..package import hardware_record
from ..splits import (
    EVERYONE,
)
from .record import (
    RESULTS,
    _model_record,
    _split_counts,
    _study_identity,
    _worst_cases,
    _write_case_scores,
    _write_study_package,
)
from .settings import CohortStage, FoldResult, Provenance, SplitStage, StudySettings
from .stages import evaluate_split, prediction_table, train_fold

LOGGER = logging.getLogger(__name__)


def assemble(
    cohort: CohortStage, split: SplitStage, folds: list[FoldResult], *, settings: StudySettings,
    model_config: ModelConfig, output_dir: Path, provenance: Provenance, device: torch.device,
    searched: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Stage 4: the fold ensemble on the test set, the prediction table, the package and ``results.json``."""
    task, images, run_dir = cohort.task, cohort.images, split.run_dir
    ensemble_threshold, postprocessing, predictions, test_eval, extra, ensemble = _ensemble_on_test(cohort, split,
                                                                                                    folds, settings)
    trust = _controls(cohort, split, folds, settings=settings, model_config=model_config, device=device,
                      deep=(ensemble, ensemble_threshold))  # fmt: skip
    baseline_outputs = _baseline_outputs(trust)
    validation_summary = evaluate.fold_summary([f.validation["metrics"] for f in folds])
    test_fold_summary = evaluate.fold_summary([f.test["metrics"] for f in folds])
    derivatives.write_text(run_dir / derivatives.STUDY_OUTPUTS["predictions"],
                           predictions.to_csv(sep="\t", index=False, float_format="%.6g"))  # fmt: skip
    record = _model_record(settings=settings, task=task, classes=cohort.classes, model_config=model_config,
                           images=images, splits=split.splits, threshold=ensemble_threshold, folds=folds,
                           metrics={"validation_folds": validation_summary, "test_folds": test_fold_summary,
                                    "test": test_eval}, manifest_sha256=provenance.manifest_sha256)  # fmt: skip
    record.update(postprocessing)
    record.update(_trust_record(split, folds, trust=trust, searched=searched, settings=settings))
    record["distribution"] = _distribution_record(cohort, split, folds, output_dir=output_dir)
    env = {**provenance.environment, "hardware": hardware_record(),
           "determinism": determinism_record(device, settings.train.amp),
           "distributed": distributed.current().record(), "seed": settings.train.seed}  # fmt: skip
    outer = settings.split.outer_test not in (None, EVERYONE)  # an outer fold's package stays in its folder
    package = _write_study_package(output_dir, run_dir, folds, record=record,
                                   config_record=provenance.config_record, env=env, outer=outer)  # fmt: skip
    if outer:
        _save_outer_outputs(run_dir, cohort, split, {"deep": ensemble, **baseline_outputs})
    LOGGER.info("Model package: %s", package)
    results = {
        **_study_identity(cohort, settings, package, output_dir),
        "excluded": cohort.excluded,
        "n_images": len(images),
        "n_subjects": int(images["participant_id"].nunique()),
        "splits": _split_counts(split.splits, images, task),
        "splits_reused": split.reused,
        "checks": split.checks,
        "near_pairs": split.near_pairs,
        "folds": [f.summary() for f in folds],
        "validation_summary": validation_summary,
        "test_fold_summary": test_fold_summary,
        "test": test_eval,
        "threshold": ensemble_threshold,
        "design": settings.design,
        "worst": _worst_cases(predictions, task),
        "model_resolution": settings.model_resolution,
        "device": str(device),
        "wall_time_s": round(time.monotonic() - provenance.started, 1),
        **postprocessing,
        **extra,
        **trust,
        "distribution": record["distribution"],
        "transfer": ({k: v for k, v in record["transfer"].items() if k != "seen_subjects"}
                     if "transfer" in record else None),
        "search": searched,
    }
    derivatives.write_json(run_dir / RESULTS, results)
    return results


def _baseline_outputs(trust: dict[str, Any]) -> dict[str, Any]:
    """The baselines' test outputs and their learning curves' (for a nested assembly to pool), taken out of
    ``trust`` (results.json holds no arrays)."""
    outputs = {}
    for key in ("baseline", "volumes_baseline"):
        if trust.get(key):
            outputs[key] = trust[key].pop("test_output")
            for share, output in trust[key].pop("curve_outputs", {}).items():
                outputs[f"{key}_curve-{share}"] = output
    return outputs


def _trust_record(
    split: SplitStage, folds: list[FoldResult], *, trust: dict[str, Any], searched: dict[str, Any] | None,
    settings: StudySettings,
) -> dict[str, Any]:  # fmt: skip
    """What ``model.json`` keeps of the controls, the search and the transfer (with everyone its source saw)."""
    out = controls.package_summary(trust)
    if searched is not None:
        out["search"] = {k: searched[k] for k in ("n_trials", "metric", "best", "best_values", "scored_on")}
    if split.source is not None:
        out["transfer"] = transfer.record(split.source, [f.transfer or {} for f in folds], freeze=settings.freeze,
                                          moved=split.moved_to_training, seen_in_cohort=split.seen_by_source)
    return out


def _distribution_record(
    cohort: CohortStage, split: SplitStage, folds: list[FoldResult], *, output_dir: Path
) -> dict[str, Any] | None:
    """What the package records of its training distribution (:mod:`pipeline.learn.ood`): each fold's features
    described (``distribution.safetensors`` in the run folder), the threshold chosen on the validation images, and
    the quality metrics' ranges over the training participants (never the test set)."""
    if any(f.distribution is None for f in folds):
        LOGGER.warning("No distribution check recorded: a fold has fewer than 3 training images.")
        return None
    entries = [f.distribution for f in folds if f.distribution is not None]
    path = split.run_dir / ood.FILE
    ood.save_references([e["reference"] for e in entries], path)
    calibration = ood.calibrate(np.concatenate([e["validation"] for e in entries]))
    if calibration["threshold"] is None:
        LOGGER.warning("No distribution check recorded: %s.", calibration["note"])
        return None
    test_ids = set(split.members(0)["test"])
    training = cohort.images[~cohort.images["participant_id"].isin(test_ids)]
    iqms = load_qc(output_dir)
    known = iqms is not None and "source" in iqms.columns
    ranges = ood.metric_ranges(iqms[iqms["source"].isin(training["source"])]) if known else {}  # type: ignore[index]
    LOGGER.info("Distribution check: threshold %.2f chosen on %d validation image(s) (%s of them above it); %d "
                "quality metrics' ranges", calibration["threshold"], calibration["n_validation"],
                "n/a" if calibration["validation_flagged"] is None else f"{calibration['validation_flagged']:.0%}",
                len(ranges))  # fmt: skip
    return {
        "file": ood.FILE,
        "sha256": sha256_file(path),
        "features": "the network's last feature maps (a U-Net's deepest) averaged over space; per fold, their mean, "
        "SD and correlation (shrunk towards the identity, Schafer-Strimmer) over the fold's training images; an "
        "image's score is its log Mahalanobis distance (over sqrt(D)) by each fold, the folds joined by the Cauchy "
        "combination of their predictive p-values",
        "folds": [ood.fold_record(e["reference"], e["n_train"]) for e in entries],
        "calibration": calibration,
        "metric_ranges": ranges,
        "metric_rule": "a prediction interval of each metric over the training participants (Student t; Bonferroni "
        f"over the metrics, {ood.FLAG_RATE:.1%} flagged in all)",
    }


def _ensemble_on_test(
    cohort: CohortStage, split: SplitStage, folds: list[FoldResult], settings: StudySettings
) -> tuple[float, dict[str, Any], pd.DataFrame, dict[str, Any], dict[str, Any], Any]:
    """The fold ensemble (the mean of the folds' outputs; its threshold and post-processing chosen on every fold's
    validation outputs pooled) on the test set: threshold, post-processing, the prediction table of every fold and
    split and the ensemble, the test evaluation, the task's extra results (case scores written) and the ensemble's
    test outputs."""
    task, images, run_dir = cohort.task, cohort.images, split.run_dir
    test_rows = images[images["participant_id"].isin(split.members(0)["test"])]
    validation = [
        (images[images["participant_id"].isin(split.members(f.fold)["validation"])], f.validation_output) for f in folds
    ]
    threshold = task.pooled_threshold(validation)
    postprocessing = task.postprocessing(validation)
    ensemble = task.postprocessed(task.ensemble([f.test_output for f in folds]), postprocessing)
    tables = [table for fold in folds for table in fold.predictions]
    tables.append(prediction_table(task, test_rows, ensemble, "test", "ensemble", cohort.classes, threshold))
    test_eval = evaluate_split(task, test_rows, ensemble, threshold, seed=settings.train.seed, ci=True)
    extra = task.finish_study(test_rows, ensemble, run_dir=run_dir, settings=settings) if len(test_rows) else {}
    _write_case_scores(run_dir, folds, test_eval, extra)
    return threshold, postprocessing, pd.concat(tables, ignore_index=True), test_eval, extra, ensemble


def _controls(
    cohort: CohortStage, split: SplitStage, folds: list[FoldResult], *, settings: StudySettings,
    model_config: ModelConfig, device: torch.device, deep: tuple[Any, float],
) -> dict[str, Any]:  # fmt: skip
    """The study's controls: the linear baseline in the same splits (compared paired with the network's ensemble)
    and, with ``--permutation-control``, the study again on shuffled training targets."""
    task, images = cohort.task, cohort.images
    members = [split.members(f.fold) for f in folds]
    out: dict[str, Any] = {"baseline": None, "permutation_control": None}
    seed = settings.train.seed
    if task.linear_baseline is None:
        out["baseline_note"] = f"{task.name} has no linear baseline (a voxel-wise linear model is no competitor)"
    elif not settings.baseline:
        out["baseline_note"] = "skipped (--no-baseline)"
    linear = settings.baseline and task.linear_baseline is not None
    gram = baseline.timed_gram([Path(p) for p in images["array"]]) if linear else None  # read once for both
    if linear:
        out["baseline"] = controls.baseline_study(task, images, members, classes=cohort.classes, deep=deep,
                                                  seed=seed, run_dir=split.run_dir, timed_gram=gram)  # fmt: skip
        x, _, described = volumes.volume_features(settings.output_dir, images, target=settings.target)
        if x is None:
            out["volumes_baseline_note"] = f"no regional-volumes baseline: {described}"
            LOGGER.info("No regional-volumes baseline: %s", described)
        else:
            out["volumes_baseline"] = controls.baseline_study(
                task, images, members, classes=cohort.classes, deep=deep, seed=seed, run_dir=split.run_dir,
                table=(x, described), predictions=derivatives.STUDY_OUTPUTS["volumes_baseline_predictions"],
            )  # fmt: skip
    if settings.permutation_control and not task.learns_labels:  # the parser refuses it for label maps
        out["permutation_control"] = _permutation_control(cohort, split, members, settings=settings,
                                                          model_config=model_config, device=device,
                                                          gram=gram[0] if gram else None)  # fmt: skip
    return out


def _permutation_control(
    cohort: CohortStage, split: SplitStage, members: list[dict[str, list[str]]], *, settings: StudySettings,
    model_config: ModelConfig, device: torch.device, gram: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The same folds trained on targets shuffled among the training and validation participants (in
    ``permutation/`` beside the folds), their ensemble and the linear baseline's scored on the true test targets."""
    task, images, seed = cohort.task, cohort.images, settings.train.seed
    test_ids = split.members(0)["test"]
    y = controls.permuted_targets(images, test_ids, derived_seed(seed, 7))
    shuffled = dataclasses.replace(cohort, images=images.assign(y=y))
    shuffled_split = dataclasses.replace(split, run_dir=split.run_dir / "permutation")
    LOGGER.info("Permutation control: the %d fold(s) again on shuffled training targets", len(members))
    folds = [train_fold(k, cohort=shuffled, split=shuffled_split, settings=settings, model_config=model_config,
                        device=device) for k in range(len(members))]  # fmt: skip
    validation = [(shuffled.images[shuffled.images["participant_id"].isin(m["validation"])], f.validation_output)
                  for m, f in zip(members, folds, strict=True)]  # fmt: skip
    test_rows = images[images["participant_id"].isin(test_ids)]
    ensemble = task.ensemble([f.test_output for f in folds])
    deep = task.evaluate_rows(test_rows, ensemble, threshold=task.pooled_threshold(validation), seed=seed, ci=True)
    linear = (controls.permuted_baseline(task, images, members, y=y, classes=cohort.classes, seed=seed, gram=gram)
              if settings.baseline else None)  # fmt: skip
    headline = task.headline_metric(len(cohort.classes))
    LOGGER.info("Permutation control: test %s %.3f (network)%s", headline, deep["metrics"][headline],
                f", {linear['metrics'][headline]:.3f} (linear)" if linear else "")  # fmt: skip
    kept = images[~images["participant_id"].isin(test_ids)]
    return {
        "targets": "shuffled among the training and validation participants (one target per participant); the test "
        "participants' targets untouched",
        "agreement": float(np.mean(y[kept.index.map(images.index.get_loc)] == kept["y"].to_numpy())),
        "headline": headline,
        "deep": deep,
        "baseline": linear,
        "folds": [f.summary() for f in folds],
    }


#: What an outer fold keeps for the nested assembly (:mod:`.nested`): its test rows and the test outputs of the
#: network's ensemble and of each baseline (``<name>.npy``).
OUTER_ROWS = "outer_test_rows.tsv"


def _save_outer_outputs(run_dir: Path, cohort: CohortStage, split: SplitStage, outputs: dict[str, Any]) -> None:
    test_rows = cohort.images[cohort.images["participant_id"].isin(split.members(0)["test"])]
    columns = [c for c in cohort.task.prediction_row_columns if c in test_rows.columns]
    derivatives.write_text(run_dir / OUTER_ROWS, test_rows[columns].to_csv(sep="\t", index=False))
    for name, values in outputs.items():
        with derivatives.atomic_path(run_dir / f"outer_test_output_{name}.npy") as tmp:
            np.save(tmp, np.asarray(values))
