"""A study's stages before assembly: gather the cohort, split it with the leakage checks (and the transfer guard),
train each fold (its distribution check calibrated beside it), evaluate a fold's predictions.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ... import derivatives
from ...errors import InputDataError, UsageError
from .. import distributed, leakage, ood, transfer
from ..cohort import usable_images
from ..data import derived_seed, reference_image
from ..models import ModelConfig, build_model
from ..registry import get_task, resolve_task_name
from ..splits import (
    fingerprint,
    identical_image_units,
    load_or_make_splits,
    save_splits,
    subject_table,
)
from ..task import Task, target_scale
from ..train import (
    FitHooks,
    TargetScale,
    fit,
    load_weights,
    predict,
)
from .settings import (
    FOLD_RECORD,
    CohortStage,
    FoldResult,
    SplitStage,
    StudySettings,
    fold_finished,
    fold_key,
    study_run_dir,
)

LOGGER = logging.getLogger(__name__)


def gather_cohort(
    manifest: pd.DataFrame, *, output_dir: Path, cache_dir: Path, qc: pd.DataFrame | None, settings: StudySettings
) -> CohortStage:
    """Stage 1: the task resolved (once, for the whole study); the images it learns from, cached as arrays."""
    task = study_task(manifest, output_dir=output_dir, qc=qc, settings=settings)
    _check_selection_metric(task, settings.train.selection_metric)  # before minutes of gathering
    images, classes, excluded = task.build_cohort(
        manifest, output_dir=output_dir, cache_dir=cache_dir, qc=qc, settings=settings
    )
    record = derivatives.results_path(output_dir, settings.target, settings.architecture,
                                      settings.inputs).relative_to(output_dir)  # fmt: skip
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


def split_and_check(
    stage: CohortStage, *, output_dir: Path, settings: StudySettings, source: transfer.Source | None = None
) -> SplitStage:
    """Stage 2: subject-level splits (made or reused) and the leakage checks; leaking splits stop here. With a
    transfer ``source``, participants it saw leave the test set (fresh splits) or refuse the splits (fixed ones)."""
    images, task = stage.images, stage.task
    stratify = settings.stratify or (("target",) if task.stratify_by_target else ())
    columns = tuple(c for c in stratify if c != "target")
    site_columns = tuple(c for c in leakage.SITE_COLUMNS if c in images.columns)
    subjects = subject_table(images, tuple(dict.fromkeys(columns + site_columns)), task)
    split_settings = dataclasses.replace(settings.split, stratify=tuple(stratify))
    run_dir = study_run_dir(output_dir, settings)
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
    seen: dict[str, str] = {}
    moved: list[dict[str, str]] = []
    if source is not None:
        seen = transfer.seen_participants(images, source.seen_subjects(), str(source.record.get("name")),
                                          dataset=derivatives.source_dataset(settings.bids_dir)["key"])  # fmt: skip
        splits, moved = transfer.guard_splits(splits, seen, reused=reused, splits_file=run_dir.parent / "splits.tsv")
        if moved:
            save_splits(run_dir.parent, splits, settings=split_settings, data_fingerprint=fingerprint(images))
    arrays = [np.load(p, mmap_mode="r") for p in images["array"]]
    near_check, near_pairs = leakage.check_near_duplicates(images, arrays, splits)
    checks = [
        leakage.check_subject_overlap(splits),
        leakage.check_identical_images(images, splits),
        near_check,
        *task.leakage_checks(subjects, seed=settings.train.seed),
        *([_source_check(source, seen, moved)] if source is not None else []),
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
    return SplitStage(splits=splits, reused=reused, checks=checks, near_pairs=near_pairs, run_dir=run_dir,
                      source=source, seen_by_source=seen, moved_to_training=moved)  # fmt: skip


def _source_check(source: transfer.Source, seen: dict[str, str], moved: list[dict[str, str]]) -> dict[str, Any]:
    """The leakage check across studies: no participant the ``--init-from`` model saw is in the test set."""
    moves = [f"{m['participant_id']} moved from the {m.get('from', 'test')} set into training: {m['reason']}"
             for m in moved]  # fmt: skip
    summary = (f"{len(seen)} participant(s) of this cohort were seen by {source.record.get('name')} (by image content, "
               "or by participant ID within the same dataset): none is in the test set or a validation fold")
    return leakage.check_record("Subjects of the source model (--init-from)", moves, severity="warning", detail=summary)


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
    task = cohort.task
    rows, data, network, scale, transferred = fold_setup(fold, cohort=cohort, split=split, settings=settings,
                                                          model_config=model_config)  # fmt: skip
    result = fit_fold(fold, network, data, task=task, split=split, settings=settings, model_config=model_config,
                       scale=scale, device=device)  # fmt: skip
    best_path = split.run_dir / f"fold-{fold}" / f"best-{settings.train.selection_metric}.safetensors"
    if not best_path.exists():  # e.g. AUC undefined on every epoch: fall back to the loss
        best_path = best_path.with_name("best-loss.safetensors")
    load_weights(network, best_path)
    network.to(device)
    outputs = {
        name: predict(network, data[name], task=task, device=device, scale=scale)  # fp32, as the package is used
        for name in task.predicted_splits if len(rows[name])
    }
    for name in task.predicted_splits:
        if name not in outputs:  # a study on everyone has no test set: no outputs, the trailing shape kept
            outputs[name] = outputs["validation"][:0]
    threshold = task.pooled_threshold([(rows["validation"], outputs["validation"])])
    distribution = _fold_distribution(task, network, data, device=device)
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
        validation=evaluate_split(task, rows["validation"], outputs["validation"], threshold, seed=fold, ci=False),
        test=evaluate_split(task, rows["test"], outputs["test"], threshold, seed=fold, ci=False),
        predictions=[
            prediction_table(task, rows[name], outputs[name], name, str(fold), cohort.classes, threshold)
            for name in task.predicted_splits
        ],
        validation_output=outputs["validation"],
        test_output=outputs["test"],
        transfer=transferred,
        distribution=distribution,
    )


def _fold_distribution(
    task: Task, network: torch.nn.Module, data: dict[str, Any], *, device: torch.device
) -> dict[str, Any] | None:
    """A fold's training features described (the distribution check's reference), and the scores of its validation
    images (which it did not learn from)."""
    train = task.features(network, data["train"], device=device)
    if len(train) < 3:
        return None
    reference = ood.fit_reference(train)
    validation = task.features(network, data["validation"], device=device) if len(data["validation"]) else train[:0]
    return {"reference": reference, "n_train": len(train),
            "validation": reference.score(validation) if len(validation) else np.zeros(0)}  # fmt: skip


def fold_setup(
    fold: int, *, cohort: CohortStage, split: SplitStage, settings: StudySettings, model_config: ModelConfig,
    parts: tuple[str, ...] = ("train", "validation", "test"),
) -> tuple[dict[str, pd.DataFrame], dict[str, Any], torch.nn.Module, TargetScale, dict[str, Any] | None]:
    """A fold's rows and data of ``parts``, its network (seeded; from the ``--init-from`` source's weights, its
    standardisation the fold's training images'), the target scale and what the transfer loaded."""
    task, images = cohort.task, cohort.images
    members = split.members(fold)
    ids = {"train": members["train"], "validation": members["validation"], "test": members["test"]}
    rows = {name: images[images["participant_id"].isin(ids[name])] for name in parts}
    scale = target_scale(task, rows["train"]["y"].to_numpy())
    torch.manual_seed(derived_seed(settings.train.seed, fold, 99))
    network = build_model(model_config)
    transferred = None
    if split.source is not None:  # the source's weights; its head anew where the targets differ
        record = split.source.record
        same = record.get("target") == settings.target and record.get("classes") == cohort.classes
        transferred = transfer.initialise(network, split.source, fold, freeze=settings.freeze, same_targets=same)
    data = {name: _data(task, part, settings, model_config) for name, part in rows.items()}
    if task.standardize_inputs:
        network.set_reference(*reference_image(data["train"]))  # type: ignore[operator]
    return rows, data, network, scale, transferred


def fit_fold(
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
        "deadline": settings.deadline,
    }
    distributed.share_job(job)  # the other ranks of a distributed run fit the same job with this one
    result = fit(network, data["train"], data["validation"], fold_settings, task=task, run_dir=fold_dir,
                 device=device, scale=scale, resume=job["resume"],
                 hooks=FitHooks(label, tensorboard=settings.tensorboard, deadline=job["deadline"]))  # fmt: skip
    distributed.job_done()
    if not finished:
        derivatives.write_json(
            fold_dir / FOLD_RECORD,
            {"fold": fold, **key, "epochs": len(result.history), "stopped_early": result.stopped_early,
             "world_size": distributed.current().size,
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )  # fmt: skip
    return result


def serve_jobs(device: torch.device) -> int:
    """The other ranks of a distributed run: fit each job rank 0 shares, until it says there are no more.

    Returns the number of jobs fitted. A job ``{"stop": message}`` means rank 0 ended with an error.
    """
    fitted = 0
    while (job := distributed.share_job(None)) is not None:
        if "stop" in job:
            raise distributed.stopped_by_main(job)
        fit(job["network"], job["train"], None, job["settings"], task=job["task"], run_dir=job["run_dir"],
            device=device, scale=job["scale"], resume=job["resume"],
            hooks=FitHooks(job["label"], deadline=job["deadline"]))  # fmt: skip
        fitted += 1
    return fitted


def warn_of_folds_to_train(split: SplitStage, settings: StudySettings) -> None:
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


def _data(task: Task, rows: pd.DataFrame, settings: StudySettings, model_config: ModelConfig) -> Any:
    return task.dataset(rows, patch_size=settings.patch_size, n_outputs=model_config.n_outputs)


#: The evaluation of a study that has no test set (it learned from everyone: :data:`~.splits.EVERYONE`).
NO_TEST = {"n": 0, "n_subjects": 0, "metrics": {}, "note": "no test set: this model learned from every participant "
           "(its inner folds only); the nested cross-validation's outer folds estimate its performance"}  # fmt: skip


def evaluate_split(
    task: Task, rows: pd.DataFrame, outputs: Any, threshold: float, *, seed: int, ci: bool
) -> dict[str, Any]:
    """A split's evaluation (:data:`NO_TEST` when it is empty)."""
    if rows.empty:
        return dict(NO_TEST)
    return task.evaluate_rows(rows, outputs, threshold=threshold, seed=seed, ci=ci)


def prediction_table(
    task: Task, rows: pd.DataFrame, outputs: np.ndarray, split: str, fold: str, classes: list[str], threshold: float
) -> pd.DataFrame:
    """The predictions of one split of one fold: the rows' identifying columns and the task's prediction columns."""
    table = rows[list(task.prediction_row_columns)].copy()
    table.insert(3, "split", split)
    table.insert(4, "fold", fold)
    return task.prediction_columns(table, outputs, classes, threshold)
