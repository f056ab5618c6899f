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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import derivatives
from ..errors import InputDataError, UsageError
from ..kinds import DEFAULT_CHANNELS, REFERENCE_KIND
from ..ops.template import TEMPLATE_SPACE, resolution_label
from ..progress import Progress
from . import distributed, evaluate, leakage
from .cohort import usable_images
from .data import derived_seed, reference_image
from .models import ModelConfig, build_model
from .package import MODEL_JSON, hardware_record, write_package
from .splits import (
    SplitSettings,
    fingerprint,
    fold_members,
    identical_image_units,
    load_or_make_splits,
    subject_table,
)
from .tasks import get_task, resolve_task_name
from .tasks.base import Task
from .train import (
    TargetScale,
    TrainSettings,
    determinism_record,
    fit,
    load_weights,
    predict,
    resolve_device,
    seed_everything,
)

LOGGER = logging.getLogger(__name__)
RESULTS = derivatives.STUDY_OUTPUTS["results"]
#: Case-wise scores of voxel-wise tasks (per image and structure, every fold and split, both spaces).
CASE_SCORES = derivatives.STUDY_OUTPUTS["case_scores"]


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
    bids_dir: Path
    output_dir: Path
    labels: Path | None
    label_desc: str | None
    patch_size: int
    device: str
    resume: bool
    resplit: bool
    tensorboard: bool
    learning_settings: dict[str, Any]
    fold: tuple[int, ...] = ()  # only these folds (fold-parallel jobs); none: every fold, then the assembly
    inputs: tuple[str, ...] = DEFAULT_CHANNELS  # the image kinds fed as channels, in order


def _settings_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


#: Written into a fold's folder when its training has finished: what it was trained with (hashes).
FOLD_RECORD = derivatives.STUDY_OUTPUTS["fold_record"]


def prepare_run_dir(run_dir: Path, settings: StudySettings, split: SplitStage, folds: Sequence[int]) -> None:
    """Check ``--resume`` against the settings of the interrupted run, or start ``folds`` afresh.

    Folds that finished with the same settings and splits (their ``fold.json``) are kept and reused. Fold-parallel
    jobs (``--fold``) run at once: each touches its own folds only, and all write the same ``run.json``.
    """
    record_path = run_dir / "run.json"
    wanted = json.loads(json.dumps(settings.learning_settings))
    old = json.loads(record_path.read_text()).get("learning_settings", {}) if record_path.exists() else None
    if settings.resume and old is not None:
        diff = _settings_difference(old, wanted)
        if diff:
            raise UsageError(
                "--resume refused: the settings differ from those of the run in "
                f"{run_dir} ({'; '.join(diff)}). Resume with the same settings, or run without --resume to start over."
            )
        return
    stale = [run_dir / f"fold-{k}" for k in folds] if settings.fold else sorted(run_dir.glob("fold-*"))
    for fold_dir in stale:
        fold = int(fold_dir.name.removeprefix("fold-"))
        if fold_dir.exists() and not (fold in folds and fold_finished(fold_dir, fold_key(settings, split, fold))):
            shutil.rmtree(fold_dir)
    derivatives.write_json(record_path, {"learning_settings": wanted})


def fold_key(settings: StudySettings, split: SplitStage, fold: int) -> dict[str, str]:
    """What a fold's training depends on: the learning settings, and who is in its train/validation/test sets."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    return {"settings_sha256": digest(settings.learning_settings), "members_sha256": digest(split.members(fold))}


def fold_finished(fold_dir: Path, key: dict[str, str]) -> bool:
    """Whether ``fold_dir`` holds a finished training made with ``key`` (and its checkpoint)."""
    record_path = fold_dir / FOLD_RECORD
    if not record_path.exists() or not (fold_dir / "checkpoint.pt").exists():
        return False
    record = json.loads(record_path.read_text())
    return all(record.get(name) == value for name, value in key.items())


def selected_folds(settings: StudySettings, n_folds: int) -> list[int]:
    """The folds this run trains: ``--fold`` (checked against the splits), else all of them."""
    wrong = [k for k in settings.fold if k >= n_folds]
    if wrong:
        raise UsageError(f"--fold {wrong[0]} is out of range: the splits have folds 0 to {n_folds - 1}.")
    return list(settings.fold) or list(range(n_folds))


@dataclass(frozen=True)
class CohortStage:
    """Who is learned from: the cached images (one row each), their classes, the task and what was left out."""

    images: pd.DataFrame
    classes: list[str]
    task: Task
    excluded: list[dict[str, str]]


@dataclass(frozen=True)
class SplitStage:
    """The subject-level splits, the leakage checks that passed them and the run folder."""

    splits: pd.DataFrame
    reused: bool
    checks: list[dict[str, Any]]
    near_pairs: list[dict[str, Any]]
    run_dir: Path

    @property
    def n_folds(self) -> int:
        return int(self.splits["fold"].dropna().nunique())

    def members(self, fold: int) -> dict[str, list[str]]:
        return fold_members(self.splits, fold)


@dataclass(frozen=True)
class FoldResult:
    """One trained fold: its kept weights, history and evaluations, and its outputs on every split."""

    fold: int
    weights: Path
    scale: TargetScale
    threshold: float
    history: list[dict[str, Any]]
    best: dict[str, dict[str, float]]
    stopped_early: bool
    outlook: dict[str, Any] | None
    n_train: int
    n_validation: int
    validation: dict[str, Any]
    test: dict[str, Any]
    predictions: list[pd.DataFrame]
    validation_output: np.ndarray
    test_output: np.ndarray

    def summary(self) -> dict[str, Any]:
        """What ``results.json`` keeps of the fold."""
        return {
            "fold": self.fold, "threshold": self.threshold, "history": self.history, "best": self.best,
            "stopped_early": self.stopped_early, "outlook": self.outlook, "n_train": self.n_train,
            "n_validation": self.n_validation,
            "validation": self.validation, "test": self.test, "scale": dataclasses.asdict(self.scale),
        }  # fmt: skip


def gather_cohort(
    manifest: pd.DataFrame, *, output_dir: Path, cache_dir: Path, qc: pd.DataFrame | None, settings: StudySettings
) -> CohortStage:
    """Stage 1: the task resolved (once, for the whole study); the images it learns from, cached as arrays."""
    task = study_task(manifest, output_dir=output_dir, qc=qc, settings=settings)
    _check_selection_metric(task, settings.train.selection_metric)  # before minutes of gathering
    images, classes, excluded = task.build_cohort(
        manifest, output_dir=output_dir, cache_dir=cache_dir, qc=qc, settings=settings
    )
    record = derivatives.results_path(output_dir, settings.target, settings.architecture).relative_to(output_dir)
    for message in excluded_messages(excluded, f"OUTPUT_DIR/{record.as_posix()}, under excluded"):
        LOGGER.warning(message)
    return CohortStage(images=images, classes=classes, task=task, excluded=excluded)


def study_task(manifest: pd.DataFrame, *, output_dir: Path, qc: pd.DataFrame | None, settings: StudySettings) -> Task:
    """The task object of ``--task``; for ``auto``, the one the values of the usable images' target call for."""
    name = settings.task
    if name == "auto":
        table, _ = usable_images(
            manifest, output_dir=output_dir, target=settings.target, resolution_mm=settings.model_resolution, qc=qc,
            exclude_qc_outliers=settings.exclude_qc_outliers, include_failed_qc=settings.include_failed_qc,
        )  # fmt: skip
        name = resolve_task_name(table["target"], name)
    return get_task(name)


#: Images left out for one reason that the log names one by one; beyond, one line names the first few.
EXCLUDED_LISTED = 20


def excluded_messages(excluded: Sequence[dict[str, str]], record: str, listed: int | None = None) -> list[str]:
    """The log's lines on the images left out of learning: one an image, or one a reason when many share it
    (10,000 participants with 4% failing QC must not mean 400 warnings); ``record``: the file listing them all;
    ``listed``: default :data:`EXCLUDED_LISTED`.

    >>> excluded_messages([{"source": "sub-01/anat/a.nii.gz", "reason": "no value for age"}], "results.json")
    ['Not learning from sub-01/anat/a.nii.gz: no value for age.']
    >>> many = [{"source": f"sub-{i:02d}/anat/a.nii.gz", "reason": "failed quality control"} for i in range(30)]
    >>> excluded_messages(many, "results.json", listed=3)[0]
    'Not learning from 30 images: failed quality control: sub-00/anat/a.nii.gz, ... and 27 more (all in results.json).'
    """
    listed = EXCLUDED_LISTED if listed is None else listed
    by_reason: dict[str, list[str]] = {}
    for item in excluded:
        by_reason.setdefault(item["reason"], []).append(item["source"])
    messages = []
    for reason, sources in by_reason.items():
        if len(sources) <= listed:
            messages += [f"Not learning from {source}: {reason}." for source in sources]
        else:
            messages.append(
                f"Not learning from {len(sources)} images: {reason}: {', '.join(sources[:listed])} and "
                f"{len(sources) - listed} more (all in {record})."
            )
    return messages


def _check_selection_metric(task: Task, metric: str) -> None:
    if metric not in task.direction:
        raise UsageError(
            f"--selection-metric {metric} does not apply to {task.name}; use one of {', '.join(task.direction)}."
        )


def split_and_check(stage: CohortStage, *, output_dir: Path, settings: StudySettings) -> SplitStage:
    """Stage 2: subject-level splits (made or reused) and the leakage checks; leaking splits stop here."""
    images, task = stage.images, stage.task
    stratify = settings.stratify or (("target",) if task.stratify_by_target else ())
    columns = tuple(c for c in stratify if c != "target")
    site_columns = tuple(c for c in leakage.SITE_COLUMNS if c in images.columns)
    subjects = subject_table(images, tuple(dict.fromkeys(columns + site_columns)), task)
    split_settings = dataclasses.replace(settings.split, stratify=tuple(stratify))
    run_dir = derivatives.study_dir(output_dir, settings.target, settings.architecture)
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
        *task.leakage_checks(subjects, seed=settings.train.seed),
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
    return SplitStage(splits=splits, reused=reused, checks=checks, near_pairs=near_pairs, run_dir=run_dir)


def train_fold(
    fold: int,
    *,
    cohort: CohortStage,
    split: SplitStage,
    settings: StudySettings,
    model_config: ModelConfig,
    device: torch.device,
) -> FoldResult:
    """Stage 3 (once per fold): fit, keep the best weights, predict and evaluate every split."""
    task, images = cohort.task, cohort.images
    members = split.members(fold)
    rows = {
        "train": images[images["participant_id"].isin(members["train"])],
        "validation": images[images["participant_id"].isin(members["validation"])],
        "test": images[images["participant_id"].isin(split.members(0)["test"])],
    }
    scale = task.target_scale(rows["train"]["y"].to_numpy())
    torch.manual_seed(derived_seed(settings.train.seed, fold, 99))
    network = build_model(model_config)
    data = {name: _data(task, part, settings, model_config) for name, part in rows.items()}
    if task.standardize_inputs:
        network.set_reference(*reference_image(data["train"]))  # type: ignore[operator]
    result = _fit_fold(fold, network, data, task=task, split=split, settings=settings, model_config=model_config,
                       scale=scale, device=device)  # fmt: skip
    best_path = split.run_dir / f"fold-{fold}" / f"best-{settings.train.selection_metric}.safetensors"
    if not best_path.exists():  # e.g. AUC undefined on every epoch: fall back to the loss
        best_path = best_path.with_name("best-loss.safetensors")
    load_weights(network, best_path)
    network.to(device)
    outputs = {
        name: predict(network, data[name], task=task, device=device, scale=scale)  # fp32, as the package is used
        for name in task.predicted_splits
    }
    threshold = task.choose_threshold(rows["validation"]["y"].to_numpy(), outputs["validation"])
    return FoldResult(
        fold=fold,
        weights=best_path,
        scale=scale,
        threshold=threshold,
        history=result.history,
        best=result.best,
        stopped_early=result.stopped_early,
        outlook=result.outlook,
        n_train=len(rows["train"]),
        n_validation=len(rows["validation"]),
        validation=_evaluate(task, rows["validation"], outputs["validation"], threshold, seed=fold, ci=False),
        test=_evaluate(task, rows["test"], outputs["test"], threshold, seed=fold, ci=False),
        predictions=[
            _prediction_table(task, rows[name], outputs[name], name, str(fold), cohort.classes, threshold)
            for name in task.predicted_splits
        ],
        validation_output=outputs["validation"],
        test_output=outputs["test"],
    )


def _fit_fold(
    fold: int, network: torch.nn.Module, data: dict[str, Any], *, task: Task, split: SplitStage,
    settings: StudySettings, model_config: ModelConfig, scale: TargetScale, device: torch.device,
) -> Any:  # fmt: skip
    """Fit one fold (shared with the other ranks of a distributed run); a fold that finished earlier with these
    settings and splits is reused from its checkpoint. Returns the :class:`~pipeline.learn.train.FitResult`."""
    fold_settings = dataclasses.replace(
        settings.train, n_outputs=model_config.n_outputs, seed=derived_seed(settings.train.seed, fold)
    )
    fold_dir = split.run_dir / f"fold-{fold}"
    label = f"fold {fold + 1}/{split.n_folds} " if split.n_folds > 1 else ""
    key = fold_key(settings, split, fold)
    finished = fold_finished(fold_dir, key)
    if finished:
        LOGGER.info("%sfinished earlier with these settings and splits (%s): reused", label, fold_dir / FOLD_RECORD)
    job = {
        "network": network,
        "train": data["train"],
        "settings": fold_settings,
        "task": task,
        "run_dir": fold_dir,
        "scale": scale,
        "resume": settings.resume or finished,  # a finished fit returns at once from its checkpoint
        "label": label,
    }
    distributed.share_job(job)  # the other ranks of a distributed run fit the same job with this one
    result = fit(network, data["train"], data["validation"], fold_settings, task=task, run_dir=fold_dir,
                 device=device, scale=scale, resume=job["resume"], label=label,
                 tensorboard=settings.tensorboard)  # fmt: skip
    distributed.job_done()
    if not finished:
        derivatives.write_json(
            fold_dir / FOLD_RECORD,
            {"fold": fold, **key, "epochs": len(result.history), "stopped_early": result.stopped_early,
             "world_size": distributed.current().size,
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )  # fmt: skip
    return result


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
) -> dict[str, Any] | None:
    """Train and evaluate; write the model package and ``results.json``; return the results (None when
    ``--fold`` trained some folds only: the assembly is a later run)."""
    started = time.monotonic()
    device = resolve_device(settings.device)
    seed_everything(settings.train.seed)
    cohort = gather_cohort(manifest, output_dir=output_dir, cache_dir=cache_dir, qc=qc, settings=settings)
    split = split_and_check(cohort, output_dir=output_dir, settings=settings)
    selected = selected_folds(settings, split.n_folds)
    if not settings.fold:
        _warn_of_folds_to_train(split, settings)
    prepare_run_dir(split.run_dir, settings, split, selected)
    model_config = ModelConfig(
        architecture=settings.architecture,
        n_outputs=cohort.task.n_outputs(cohort.classes),
        in_shape=tuple(int(s) for s in np.load(cohort.images["array"].iloc[0], mmap_mode="r").shape[-3:]),  # type: ignore[arg-type]
        in_channels=len(settings.inputs),
    )
    progress = Progress("folds", len(selected), logger=LOGGER, log_every_s=0)  # a line as each fold ends
    folds = []
    for fold in selected:
        progress.update(running=1)
        folds.append(train_fold(fold, cohort=cohort, split=split, settings=settings, model_config=model_config,
                                device=device))  # fmt: skip
        progress.update(done=progress.done + 1, running=0)
    if settings.fold:
        LOGGER.info(
            "Trained fold(s) %s of %d in %s. When every fold has finished, run the group level again without "
            "--fold (same options) to assemble the model, its evaluation and the reports.",
            ", ".join(map(str, selected)), split.n_folds, split.run_dir,
        )  # fmt: skip
        return None
    return assemble(
        cohort,
        split,
        folds,
        settings=settings,
        model_config=model_config,
        output_dir=output_dir,
        config_record=config_record,
        environment=environment,
        manifest_sha256=manifest_sha256,
        device=device,
        started=started,
    )


def serve_jobs(device: torch.device) -> int:
    """The other ranks of a distributed run: fit each job rank 0 shares, until it says there are no more.

    Returns the number of jobs fitted. A job ``{"stop": message}`` means rank 0 ended with an error.
    """
    fitted = 0
    while (job := distributed.share_job(None)) is not None:
        if "stop" in job:
            raise distributed.stopped_by_main(job)
        fit(job["network"], job["train"], None, job["settings"], task=job["task"], run_dir=job["run_dir"],
            device=device, scale=job["scale"], resume=job["resume"], label=job["label"])  # fmt: skip
        fitted += 1
    return fitted


def _warn_of_folds_to_train(split: SplitStage, settings: StudySettings) -> None:
    """An assembly after fold-parallel jobs that finds folds still to train says so (it trains them itself)."""
    folds = range(split.n_folds)
    finished = [k for k in folds if fold_finished(split.run_dir / f"fold-{k}", fold_key(settings, split, k))]
    missing = [k for k in folds if k not in finished]
    if finished and missing:
        LOGGER.warning(
            "Fold(s) %s have no finished training with these settings and splits (missing, failed, or trained with "
            "other options): this run trains them one after another. To train them in parallel, run each as its own "
            "job with --fold K, then this command again.",
            ", ".join(map(str, missing)),
        )


def assemble(
    cohort: CohortStage,
    split: SplitStage,
    folds: list[FoldResult],
    *,
    settings: StudySettings,
    model_config: ModelConfig,
    output_dir: Path,
    config_record: dict[str, Any],
    environment: dict[str, Any],
    manifest_sha256: str,
    device: torch.device,
    started: float,
) -> dict[str, Any]:
    """Stage 4: the fold ensemble on the test set, the prediction table, the package and ``results.json``."""
    task, images, run_dir = cohort.task, cohort.images, split.run_dir
    ensemble_threshold, postprocessing, predictions, test_eval, extra = _ensemble_on_test(cohort, split, folds,
                                                                                          settings)  # fmt: skip
    validation_summary = evaluate.fold_summary([f.validation["metrics"] for f in folds])
    test_fold_summary = evaluate.fold_summary([f.test["metrics"] for f in folds])
    table = predictions.to_csv(sep="\t", index=False, float_format="%.6g")
    derivatives.write_text(run_dir / derivatives.STUDY_OUTPUTS["predictions"], table)
    metrics = {"validation_folds": validation_summary, "test_folds": test_fold_summary, "test": test_eval}
    record = _model_record(settings=settings, task=task, classes=cohort.classes, model_config=model_config,
                           images=images, splits=split.splits, threshold=ensemble_threshold, folds=folds,
                           metrics=metrics, manifest_sha256=manifest_sha256)  # fmt: skip
    record.update(postprocessing)
    env = {**environment, "hardware": hardware_record(), "determinism": determinism_record(device, settings.train.amp),
           "distributed": distributed.current().record(), "seed": settings.train.seed}  # fmt: skip
    package = _write_study_package(output_dir, run_dir, folds, record=record, config_record=config_record, env=env)
    LOGGER.info("Model package: %s", package)
    results = {
        "target": settings.target,
        "task": task.name,
        "classes": cohort.classes,
        "positive_class": cohort.classes[-1] if len(cohort.classes) == 2 else None,
        "architecture": settings.architecture,
        "package": package.relative_to(output_dir).as_posix(),
        "content_sha256": json.loads((package / MODEL_JSON).read_text())["content_sha256"],
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
        "worst": _worst_cases(predictions, task),
        "model_resolution": settings.model_resolution,
        "device": str(device),
        "wall_time_s": round(time.monotonic() - started, 1),
        **postprocessing,
        **extra,
    }
    derivatives.write_json(run_dir / RESULTS, results)
    return results


def _ensemble_on_test(
    cohort: CohortStage, split: SplitStage, folds: list[FoldResult], settings: StudySettings
) -> tuple[float, dict[str, Any], pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """The fold ensemble (the mean of the folds' outputs; its threshold and post-processing chosen on every fold's
    validation outputs pooled) on the test set: threshold, post-processing, the prediction table of every fold and
    split and the ensemble, the test evaluation, and the task's extra results (case scores written)."""
    task, images, run_dir = cohort.task, cohort.images, split.run_dir
    test_rows = images[images["participant_id"].isin(split.members(0)["test"])]
    validation = [
        (images[images["participant_id"].isin(split.members(f.fold)["validation"])], f.validation_output) for f in folds
    ]
    threshold = task.pooled_threshold(validation)
    postprocessing = task.postprocessing(validation)
    ensemble = task.postprocessed(task.ensemble([f.test_output for f in folds]), postprocessing)
    tables = [table for fold in folds for table in fold.predictions]
    tables.append(_prediction_table(task, test_rows, ensemble, "test", "ensemble", cohort.classes, threshold))
    test_eval = _evaluate(task, test_rows, ensemble, threshold, seed=settings.train.seed, ci=True)
    extra = task.finish_study(test_rows, ensemble, run_dir=run_dir, settings=settings)
    _write_case_scores(run_dir, folds, test_eval, extra)
    return threshold, postprocessing, pd.concat(tables, ignore_index=True), test_eval, extra


def _write_study_package(
    output_dir: Path, run_dir: Path, folds: list[FoldResult], *, record: dict[str, Any],
    config_record: dict[str, Any], env: dict[str, Any],
) -> Path:  # fmt: skip
    """The model package: ``model.json``, each fold's kept weights, and the evidence they came from."""
    files: dict[str, Any] = {
        "config.json": config_record,
        "environment.json": env,
        "splits.tsv": run_dir.parent / "splits.tsv",
        "splits.json": run_dir.parent / "splits.json",
        "predictions.tsv": run_dir / derivatives.STUDY_OUTPUTS["predictions"],
    }
    if (run_dir / CASE_SCORES).exists():
        files[CASE_SCORES] = run_dir / CASE_SCORES
    for fold in folds:
        history = derivatives.STUDY_OUTPUTS["history"]
        files[f"logs/history_fold-{fold.fold}.tsv"] = run_dir / f"fold-{fold.fold}" / history
    return write_package(
        output_dir / "models",
        record=record,
        weights={f"fold-{f.fold}.safetensors": f.weights for f in folds},
        files=files,
    )


def _write_case_scores(
    run_dir: Path, folds: list[FoldResult], test_eval: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Move the case-wise scores of voxel-wise evaluations out of the records into ``case_scores.tsv``."""
    parts = []
    for fold in folds:
        for split, evaluation in (("validation", fold.validation), ("test", fold.test)):
            parts.append(_cases(evaluation, split, str(fold.fold), "template"))
    parts.append(_cases(test_eval, "test", "ensemble", "template"))
    if extra.get("test_native"):
        parts.append(_cases(extra["test_native"], "test", "ensemble", REFERENCE_KIND))  # each image's own grid
    tables = [p for p in parts if p is not None]
    if tables:
        table = pd.concat(tables, ignore_index=True)
        derivatives.write_text(
            run_dir / CASE_SCORES, table.to_csv(sep="\t", index=False, float_format="%.4f", na_rep="n/a")
        )


def _cases(evaluation: dict[str, Any], split: str, fold: str, space: str) -> pd.DataFrame | None:
    cases = evaluation.pop("cases", None)
    if not cases:
        return None
    table = pd.DataFrame(cases)
    table.insert(0, "space", space)
    table.insert(0, "fold", fold)
    table.insert(0, "split", split)
    return table


def _data(task: Task, rows: pd.DataFrame, settings: StudySettings, model_config: ModelConfig) -> Any:
    return task.dataset(rows, patch_size=settings.patch_size, n_outputs=model_config.n_outputs)


def _evaluate(task: Task, rows: pd.DataFrame, outputs: Any, threshold: float, *, seed: int, ci: bool) -> dict[str, Any]:
    return task.evaluate_rows(rows, outputs, threshold=threshold, seed=seed, ci=ci)


def _prediction_table(
    task: Task, rows: pd.DataFrame, outputs: np.ndarray, split: str, fold: str, classes: list[str], threshold: float
) -> pd.DataFrame:
    table = rows[list(task.prediction_row_columns)].copy()
    table.insert(3, "split", split)
    table.insert(4, "fold", fold)
    return task.prediction_columns(table, outputs, classes, threshold)


def _split_counts(splits: pd.DataFrame, images: pd.DataFrame, task: Task) -> list[dict[str, Any]]:
    out = []
    for fold in sorted(splits["fold"].dropna().unique()):
        for split in ("train", "validation"):
            ids = set(splits.loc[(splits["fold"] == fold) & (splits["split"] == split), "participant_id"])
            rows = images[images["participant_id"].isin(ids)]
            out.append(_count_row(f"fold {int(fold)}", split, rows, task))
    test_ids = set(splits.loc[splits["split"] == "test", "participant_id"])
    out.append(_count_row("all folds", "test", images[images["participant_id"].isin(test_ids)], task))
    return out


def _count_row(fold: str, split: str, rows: pd.DataFrame, task: Task) -> dict[str, Any]:
    return {
        "fold": fold,
        "split": split,
        "subjects": int(rows["participant_id"].nunique()),
        "images": len(rows),
        "targets": task.target_summary(rows),
    }


def _worst_cases(predictions: pd.DataFrame, task: Task, n: int = 5) -> list[dict[str, Any]]:
    test = predictions[(predictions["split"] == "test") & (predictions["fold"] == "ensemble")].copy()
    test["error_size"] = task.error_size(test)
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
    task: Task,
    classes: list[str],
    model_config: ModelConfig,
    images: pd.DataFrame,
    splits: pd.DataFrame,
    threshold: float,
    folds: list[FoldResult],
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
        "task": task.name,
        "target": settings.target,
        "classes": classes,
        "positive_class": classes[-1] if len(classes) == 2 else None,
        "threshold": threshold,
        "model": model_config.to_dict(),
        "input": {
            "channels": list(settings.inputs),  # the image kinds fed as channels, in order
            "space": TEMPLATE_SPACE,
            "resolution_mm": settings.model_resolution,
            "res": resolution_label(settings.model_resolution),
            "desc": "preproc",
            "shape": list(model_config.in_shape),
            "dtype": "float32",
            "normalisation": "per channel and image: median 0, interquartile range 1 within the T1w's brain mask in "
            "template space (participant level)",
            "standardisation": "minus the fold's training mean image, divided by the residual SD (buffers 'mean' and "
            "'scale' in each weights file)",
        },
        "target_scale": [dataclasses.asdict(f.scale) for f in folds] if task.scaled_targets else None,
        "fold_thresholds": [f.threshold for f in folds],
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
        **task.package_fields(classes=classes, settings=settings),
        "model_card": {
            "intended_use": f"Research: predicting {settings.target} from a T1w image preprocessed by bidsdl "
            f"into {TEMPLATE_SPACE} at {settings.model_resolution:g} mm.",
            "not_for_clinical_use": True,
            "limitations": "Trained on the subjects listed here; performance elsewhere is unknown until "
            "evaluated externally (bidsdl group --model).",
        },
    }
