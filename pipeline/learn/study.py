"""One learning study at the group level: cohort -> splits + leakage checks -> folds -> evaluation -> package.

Everything the group report shows of learning is written to ``results.json`` beside the training
runs, so ``--reports-only`` re-renders without training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import derivatives
from ..errors import InputDataError, UsageError
from ..ops.template import TEMPLATE_SPACE, resolution_label
from . import evaluate, leakage
from .cohort import build_cohort, cache_cohort
from .models import ModelConfig, build_model
from .package import hardware_record, write_package
from .splits import (
    SplitSettings,
    fingerprint,
    fold_members,
    identical_image_units,
    load_or_make_splits,
    subject_table,
)
from .train import (
    TargetScale,
    TrainSettings,
    Volumes,
    derived_seed,
    determinism_record,
    fit,
    load_weights,
    predict,
    reference_image,
    resolve_device,
    seed_everything,
)

LOGGER = logging.getLogger(__name__)
RESULTS = "results.json"


@dataclass(frozen=True)
class StudySettings:
    """What to learn and how (plain values, made from the run config by the group level)."""

    target: str
    task: str
    positive_class: str | None
    exclude_qc_outliers: bool
    include_failed_qc: bool
    stratify: tuple[str, ...]
    split: SplitSettings
    architecture: str
    train: TrainSettings
    model_resolution: float
    device: str
    resume: bool
    resplit: bool
    tensorboard: bool
    learning_settings: dict[str, Any]


def study_dir(output_dir: Path, target: str, architecture: str) -> Path:
    return Path(output_dir) / "learn" / f"target-{_safe(target)}" / f"arch-{architecture}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() else "" for c in text) or "target"


def _settings_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def prepare_run_dir(run_dir: Path, settings: StudySettings) -> None:
    """Check ``--resume`` against the settings of the interrupted run, or start afresh."""
    record_path = run_dir / "run.json"
    wanted = json.loads(json.dumps(settings.learning_settings))
    if settings.resume and record_path.exists():
        old = json.loads(record_path.read_text()).get("learning_settings", {})
        diff = _settings_difference(old, wanted)
        if diff:
            raise UsageError(
                "--resume refused: the settings differ from those of the run in "
                f"{run_dir} ({'; '.join(diff)}). Resume with the same settings, or run without --resume to start over."
            )
        return
    if run_dir.exists():
        for fold_dir in run_dir.glob("fold-*"):
            shutil.rmtree(fold_dir)
    derivatives.write_json(record_path, {"learning_settings": wanted})


def run_study(
    manifest: pd.DataFrame,
    *,
    output_dir: Path,
    cache_dir: Path,
    qc: pd.DataFrame | None,
    settings: StudySettings,
    config_record: dict[str, Any],
    environment: dict[str, Any],
    manifest_sha256: str,
) -> dict[str, Any]:
    """Train and evaluate; write the model package and ``results.json``; return the results."""
    started = time.monotonic()
    device = resolve_device(settings.device)
    seed_everything(settings.train.seed)
    cohort = build_cohort(
        manifest,
        output_dir=output_dir,
        target=settings.target,
        task=settings.task,
        positive_class=settings.positive_class,
        resolution_mm=settings.model_resolution,
        qc=qc,
        exclude_qc_outliers=settings.exclude_qc_outliers,
        include_failed_qc=settings.include_failed_qc,
    )
    for item in cohort.excluded:
        LOGGER.warning("Not learning from %s: %s.", item["source"], item["reason"])
    task = cohort.task
    metric = settings.train.selection_metric
    if (task == "regression") != (metric in ("loss", "mae")) and metric != "loss":
        raise UsageError(f"--selection-metric {metric} does not apply to {task}; use loss or a {task} metric.")
    images = cache_cohort(cohort.table, cache_dir)
    stratify = settings.stratify or ("target",)
    columns = tuple(c for c in stratify if c != "target")
    site_columns = tuple(c for c in leakage.SITE_COLUMNS if c in images.columns)
    subjects = subject_table(images, tuple(dict.fromkeys(columns + site_columns)), task)
    split_settings = dataclasses.replace(settings.split, stratify=tuple(stratify))
    run_dir = study_dir(output_dir, settings.target, settings.architecture)
    splits, reused = load_or_make_splits(
        run_dir.parent,
        subjects,
        split_settings,
        task=task,
        data_fingerprint=fingerprint(images),
        resplit=settings.resplit,
        units=identical_image_units(images),
    )
    LOGGER.info("Splits %s: %s", "reused" if reused else "made", run_dir.parent / "splits.tsv")
    arrays = [np.load(p, mmap_mode="r") for p in images["array"]]
    near_check, near_pairs = leakage.check_near_duplicates(images, arrays, splits)
    checks = [
        leakage.check_subject_overlap(splits),
        leakage.check_identical_images(images, splits),
        near_check,
        leakage.check_site_leakage(subjects, task=task, seed=settings.train.seed),
    ]
    for check in checks:
        log = LOGGER.warning if check["result"] != "pass" else LOGGER.info
        log("Leakage check '%s': %s%s", check["name"], check["result"], "".join(f"; {d}" for d in check["details"]))
    leaks = [d for c in checks[:3] if c["result"] == "fail" for d in c["details"] if "across splits" in d]
    if leaks:
        raise InputDataError(
            "The splits leak: "
            + "; ".join(leaks)
            + ". The same person appears under two participant IDs: remove the copy from the dataset (or the "
            "selection with --participant-label) and run the group level again with --resplit."
        )

    prepare_run_dir(run_dir, settings)
    n_outputs = len(cohort.classes) if task == "classification" else 1
    train_settings = dataclasses.replace(settings.train, task=task, n_outputs=n_outputs)
    model_config = ModelConfig(
        architecture=settings.architecture,
        n_outputs=n_outputs,
        in_shape=tuple(int(s) for s in arrays[0].shape[-3:]),  # type: ignore[arg-type]
    )
    n_folds = int(splits["fold"].dropna().nunique())
    test_ids = fold_members(splits, 0)["test"]
    test_rows = images[images["participant_id"].isin(test_ids)]
    prediction_tables: list[pd.DataFrame] = []
    fold_records: list[dict[str, Any]] = []
    test_outputs = []
    for fold in range(n_folds):
        members = fold_members(splits, fold)
        train_rows = images[images["participant_id"].isin(members["train"])]
        val_rows = images[images["participant_id"].isin(members["validation"])]
        scale = TargetScale()
        if task == "regression":
            y = train_rows["y"].to_numpy()
            scale = TargetScale(float(y.mean()), float(y.std()) or 1.0)
        fold_settings = dataclasses.replace(train_settings, seed=derived_seed(settings.train.seed, fold))
        torch.manual_seed(derived_seed(settings.train.seed, fold, 99))
        network = build_model(model_config)
        train_data = _volumes(train_rows)
        network.set_reference(*reference_image(train_data))
        fold_dir = run_dir / f"fold-{fold}"
        label = f"fold {fold + 1}/{n_folds} " if n_folds > 1 else ""
        result = fit(
            network,
            train_data,
            _volumes(val_rows),
            fold_settings,
            run_dir=fold_dir,
            device=device,
            scale=scale,
            resume=settings.resume,
            label=label,
            tensorboard=settings.tensorboard,
        )
        best_path = fold_dir / f"best-{metric}.safetensors"
        if not best_path.exists():  # e.g. AUC undefined on every epoch: fall back to the loss
            best_path = fold_dir / "best-loss.safetensors"
        load_weights(network, best_path)
        network.to(device)
        outputs = {
            name: predict(network, _volumes(rows), task=task, device=device, amp=train_settings.amp, scale=scale)
            for name, rows in (("train", train_rows), ("validation", val_rows), ("test", test_rows))
        }
        threshold = 0.5
        if task == "classification" and n_outputs == 2:
            threshold = evaluate.choose_threshold(val_rows["y"].to_numpy().astype(int), outputs["validation"][:, 1])
        fold_records.append(
            {
                "fold": fold,
                "weights": best_path,
                "scale": scale,
                "threshold": threshold,
                "history": result.history,
                "best": result.best,
                "stopped_early": result.stopped_early,
                "n_train": len(train_rows),
                "n_validation": len(val_rows),
                "validation": _evaluate(task, val_rows, outputs["validation"], threshold, seed=fold, ci=False),
                "test": _evaluate(task, test_rows, outputs["test"], threshold, seed=fold, ci=False),
            }
        )
        for name, rows in (("train", train_rows), ("validation", val_rows), ("test", test_rows)):
            prediction_tables.append(_prediction_table(rows, outputs[name], name, str(fold), cohort.classes, threshold))
        test_outputs.append(outputs["test"])

    # The ensemble: mean of the folds' outputs; its threshold chosen on the pooled validation predictions.
    pooled = pd.concat([t for t in prediction_tables if t["split"].iloc[0] == "validation"], ignore_index=True)
    ensemble_threshold = 0.5
    if task == "classification" and n_outputs == 2:
        ensemble_threshold = evaluate.choose_threshold(pooled["y"].to_numpy().astype(int), pooled["probability"])
    ensemble = np.mean(test_outputs, axis=0)
    prediction_tables.append(
        _prediction_table(test_rows, ensemble, "test", "ensemble", cohort.classes, ensemble_threshold)
    )
    predictions = pd.concat(prediction_tables, ignore_index=True)
    test_eval = _evaluate(task, test_rows, ensemble, ensemble_threshold, seed=settings.train.seed, ci=True)
    validation_summary = evaluate.fold_summary([r["validation"]["metrics"] for r in fold_records])
    test_fold_summary = evaluate.fold_summary([r["test"]["metrics"] for r in fold_records])

    derivatives.write_text(run_dir / "predictions.tsv", predictions.to_csv(sep="\t", index=False, float_format="%.6g"))
    record = _model_record(
        settings=settings,
        task=task,
        classes=cohort.classes,
        model_config=model_config,
        images=images,
        splits=splits,
        threshold=ensemble_threshold,
        folds=fold_records,
        metrics={"validation_folds": validation_summary, "test_folds": test_fold_summary, "test": test_eval},
        manifest_sha256=manifest_sha256,
    )
    env = {
        **environment,
        "hardware": hardware_record(),
        "determinism": determinism_record(device),
        "seed": settings.train.seed,
    }
    files: dict[str, Any] = {
        "config.json": config_record,
        "environment.json": env,
        "splits.tsv": run_dir.parent / "splits.tsv",
        "splits.json": run_dir.parent / "splits.json",
        "predictions.tsv": run_dir / "predictions.tsv",
    }
    for fold in range(n_folds):
        files[f"logs/history_fold-{fold}.tsv"] = run_dir / f"fold-{fold}" / "history.tsv"
    package = write_package(
        output_dir / "models",
        record=record,
        weights={f"fold-{r['fold']}.safetensors": r["weights"] for r in fold_records},
        files=files,
    )
    LOGGER.info("Model package: %s", package)
    results = {
        "target": settings.target,
        "task": task,
        "classes": cohort.classes,
        "positive_class": cohort.classes[-1] if len(cohort.classes) == 2 else None,
        "architecture": settings.architecture,
        "package": package.relative_to(output_dir).as_posix(),
        "content_sha256": json.loads((package / "model.json").read_text())["content_sha256"],
        "excluded": cohort.excluded,
        "n_images": len(images),
        "n_subjects": int(images["participant_id"].nunique()),
        "splits": _split_counts(splits, images, task),
        "splits_reused": reused,
        "checks": checks,
        "near_pairs": near_pairs,
        "folds": [
            {k: v for k, v in r.items() if k not in ("weights", "scale")} | {"scale": dataclasses.asdict(r["scale"])}
            for r in fold_records
        ],
        "validation_summary": validation_summary,
        "test_fold_summary": test_fold_summary,
        "test": test_eval,
        "threshold": ensemble_threshold,
        "worst": _worst_cases(predictions, task),
        "model_resolution": settings.model_resolution,
        "device": str(device),
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    derivatives.write_json(run_dir / RESULTS, results)
    return results


def _volumes(rows: pd.DataFrame) -> Volumes:
    return Volumes(rows["array"].tolist(), rows["y"].to_numpy())


def _evaluate(
    task: str, rows: pd.DataFrame, outputs: np.ndarray, threshold: float, *, seed: int, ci: bool
) -> dict[str, Any]:
    y = rows["y"].to_numpy()
    groups = rows["participant_id"].tolist()
    if task == "classification":
        return evaluate.evaluate_classification(y, outputs, threshold=threshold, groups=groups, seed=seed, ci=ci)
    return evaluate.evaluate_regression(y, outputs, groups=groups, seed=seed, ci=ci)


def _prediction_table(
    rows: pd.DataFrame, outputs: np.ndarray, split: str, fold: str, classes: list[str], threshold: float
) -> pd.DataFrame:
    table = rows[["participant_id", "session_id", "source", "target", "y"]].copy()
    table.insert(3, "split", split)
    table.insert(4, "fold", fold)
    if classes:
        for i, name in enumerate(classes):
            table[f"probability_{name}"] = outputs[:, i]
        if len(classes) == 2:
            table["probability"] = outputs[:, 1]
            table["predicted"] = np.where(outputs[:, 1] >= threshold, classes[1], classes[0])
        else:
            table["predicted"] = [classes[i] for i in outputs.argmax(axis=1)]
        table["threshold"] = threshold
    else:
        table["predicted"] = outputs
        table["error"] = outputs - table["y"].to_numpy()
    return table


def _split_counts(splits: pd.DataFrame, images: pd.DataFrame, task: str) -> list[dict[str, Any]]:
    out = []
    for fold in sorted(splits["fold"].dropna().unique()):
        for split in ("train", "validation"):
            ids = set(splits.loc[(splits["fold"] == fold) & (splits["split"] == split), "participant_id"])
            rows = images[images["participant_id"].isin(ids)]
            out.append(_count_row(f"fold {int(fold)}", split, rows, task))
    test_ids = set(splits.loc[splits["split"] == "test", "participant_id"])
    out.append(_count_row("all folds", "test", images[images["participant_id"].isin(test_ids)], task))
    return out


def _count_row(fold: str, split: str, rows: pd.DataFrame, task: str) -> dict[str, Any]:
    return {
        "fold": fold,
        "split": split,
        "subjects": int(rows["participant_id"].nunique()),
        "images": len(rows),
        "targets": {str(k): int(v) for k, v in rows["target"].astype(str).value_counts().sort_index().items()}
        if task == "classification"
        else {"mean": round(float(rows["y"].mean()), 2), "sd": round(float(rows["y"].std()), 2)},
    }


def _worst_cases(predictions: pd.DataFrame, task: str, n: int = 5) -> list[dict[str, Any]]:
    test = predictions[(predictions["split"] == "test") & (predictions["fold"] == "ensemble")].copy()
    if task == "classification" and "probability" in test.columns:
        test["error_size"] = (test["probability"] - test["y"]).abs()
    elif task == "classification":
        truth = test["y"].astype(int).to_numpy()
        probs = test[[c for c in test.columns if c.startswith("probability_")]].to_numpy()
        test["error_size"] = 1 - probs[np.arange(len(test)), truth]
    else:
        test["error_size"] = test["error"].abs()
    worst = test.sort_values("error_size", ascending=False).head(n)
    return [
        {
            "participant_id": row["participant_id"],
            "session_id": row["session_id"],
            "source": row["source"],
            "target": row["target"],
            "predicted": row["predicted"],
            "error": float(row["error_size"]),
        }
        for _, row in worst.iterrows()
    ]


def _model_record(
    *,
    settings: StudySettings,
    task: str,
    classes: list[str],
    model_config: ModelConfig,
    images: pd.DataFrame,
    splits: pd.DataFrame,
    threshold: float,
    folds: list[dict[str, Any]],
    metrics: dict[str, Any],
    manifest_sha256: str,
) -> dict[str, Any]:
    role = splits.assign(fold=splits["fold"].astype(object)).groupby("participant_id")["split"].agg(set)
    seen = []
    for pid, group in images.groupby("participant_id", sort=True):
        roles = role.get(pid, set())
        if "test" in roles:
            continue
        seen.append(
            {
                "participant_id": pid,
                "splits": sorted(roles),
                "images": [
                    {"source": s, "data_sha256": d, "input_sha256": i}
                    for s, d, i in zip(group["source"], group["data_sha256"], group["input_sha256"], strict=True)
                ],
            }
        )
    return {
        "name": f"{settings.target}_{settings.architecture}",
        "task": task,
        "target": settings.target,
        "classes": classes,
        "positive_class": classes[-1] if len(classes) == 2 else None,
        "threshold": threshold,
        "model": model_config.to_dict(),
        "input": {
            "space": TEMPLATE_SPACE,
            "resolution_mm": settings.model_resolution,
            "res": resolution_label(settings.model_resolution),
            "desc": "preproc",
            "shape": list(model_config.in_shape),
            "dtype": "float32",
            "normalisation": "median 0, interquartile range 1 within the template brain mask (participant level)",
            "standardisation": "minus the fold's training mean image, divided by the residual SD (buffers 'mean' and "
            "'scale' in each weights file)",
        },
        "target_scale": [dataclasses.asdict(f["scale"]) for f in folds] if task == "regression" else None,
        "fold_thresholds": [f["threshold"] for f in folds],
        "ensemble": "mean of the folds' outputs (class probabilities or values)",
        "selection_metric": settings.train.selection_metric,
        "training_subjects": seen,
        "test_subjects": sorted(set(splits.loc[splits["split"] == "test", "participant_id"])),
        "metrics": metrics,
        "data": {
            "manifest_sha256": manifest_sha256,
            "splits_sha256": hashlib.sha256(splits.to_csv(sep="\t", index=False).encode()).hexdigest(),
            "n_images": len(images),
            "n_subjects": int(images["participant_id"].nunique()),
        },
        "learning_settings": settings.learning_settings,
        "model_card": {
            "intended_use": f"Research: predicting {settings.target} from a T1w image preprocessed by bidsdl "
            f"into {TEMPLATE_SPACE} at {settings.model_resolution:g} mm.",
            "not_for_clinical_use": True,
            "limitations": "Trained on the subjects listed here; performance elsewhere is unknown until "
            "evaluated externally (bidsdl group --model).",
        },
    }
