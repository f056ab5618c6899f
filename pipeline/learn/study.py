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
from ..bids.audit import sha256_file
from ..errors import InputDataError, UsageError
from ..kinds import DEFAULT_CHANNELS, REFERENCE_KIND
from ..ops.template import TEMPLATE_SPACE, resolution_label
from ..progress import Progress
from ..qc import load_qc
from . import baseline, controls, distributed, evaluate, leakage, ood, search, transfer, volumes, walltime
from .cohort import usable_images
from .data import derived_seed, reference_image
from .models import ModelConfig, build_model
from .package import MODEL_JSON, hardware_record, write_package
from .registry import get_task, resolve_task_name
from .splits import (
    EVERYONE,
    SplitSettings,
    fingerprint,
    fold_members,
    identical_image_units,
    load_or_make_splits,
    save_splits,
    subject_table,
)
from .task import Task
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
    outer_fold: tuple[int, ...] = ()  # nested cross-validation: only these outer folds (:mod:`.nested`)
    inputs: tuple[str, ...] = DEFAULT_CHANNELS  # the image kinds fed as channels, in order
    baseline: bool = True  # a linear model beside the network (whole-image tasks)
    permutation_control: bool = False  # the study again on shuffled training targets
    init_from: Path | None = None  # transfer learning: the source model package
    freeze: bool = False  # with init_from: the encoder kept at the source's weights
    search: int = 0  # random-search trials (0: none)
    trial: tuple[int, ...] = ()  # only these trials (array jobs)
    time_limit: float | None = None  # seconds this job may run
    deadline: walltime.Deadline = walltime.NO_DEADLINE  # set by run_study from time_limit and SLURM's end
    #: A study on everyone (no test set): the evaluation its performance is expected from (the nested one's)
    expected: dict[str, Any] | None = None
    #: How the evaluation was designed (one test set or nested, chosen by whom, why): results.json and the report
    design: dict[str, Any] | None = None


#: Learning settings that change what is reported beside the folds, never a fold's training: a fold trained with
#: or without them is the same (resumed or reused either way).
BESIDE_THE_FOLDS = ("baseline", "permutation_control")


def _fold_settings(learning_settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in learning_settings.items() if k not in BESIDE_THE_FOLDS}


def _settings_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    old, new = _fold_settings(old), _fold_settings(new)
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

    return {"settings_sha256": digest(_fold_settings(settings.learning_settings)),
            "members_sha256": digest(split.members(fold))}  # fmt: skip


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
    source: transfer.Source | None = None  # --init-from
    seen_by_source: dict[str, str] = dataclasses.field(default_factory=dict)  # participant -> why
    moved_to_training: list[dict[str, str]] = dataclasses.field(default_factory=list)

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
    transfer: dict[str, Any] | None = None  # --init-from: the source fold, what was loaded, frozen, drawn anew
    #: The fold's training features described, and its validation images' and training images' (left out one at a
    #: time) scores against them (:mod:`pipeline.learn.ood`); None with fewer than 3 training images.
    distribution: dict[str, Any] | None = None

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


def study_run_dir(output_dir: Path, settings: StudySettings) -> Path:
    """The study's folder; for one outer fold of a nested cross-validation, ``learn/target-<t>/outer-<k>/<arch>``:
    beside that outer fold's own splits, as the study's folder is beside the target's."""
    run_dir = derivatives.study_dir(output_dir, settings.target, settings.architecture, settings.inputs)
    if settings.split.outer_test is None:
        return run_dir
    outer = "all" if settings.split.outer_test == EVERYONE else settings.split.outer_test
    return run_dir.parent / f"outer-{outer}" / run_dir.name


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
    rows, data, network, scale, transferred = _fold_setup(fold, cohort=cohort, split=split, settings=settings,
                                                          model_config=model_config)  # fmt: skip
    result = _fit_fold(fold, network, data, task=task, split=split, settings=settings, model_config=model_config,
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
    threshold = task.choose_threshold(rows["validation"]["y"].to_numpy(), outputs["validation"])
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
        validation=_evaluate(task, rows["validation"], outputs["validation"], threshold, seed=fold, ci=False),
        test=_evaluate(task, rows["test"], outputs["test"], threshold, seed=fold, ci=False),
        predictions=[
            _prediction_table(task, rows[name], outputs[name], name, str(fold), cohort.classes, threshold)
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


def _fold_setup(
    fold: int, *, cohort: CohortStage, split: SplitStage, settings: StudySettings, model_config: ModelConfig,
    parts: tuple[str, ...] = ("train", "validation", "test"),
) -> tuple[dict[str, pd.DataFrame], dict[str, Any], torch.nn.Module, TargetScale, dict[str, Any] | None]:
    """A fold's rows and data of ``parts``, its network (seeded; from the ``--init-from`` source's weights, its
    standardisation the fold's training images'), the target scale and what the transfer loaded."""
    task, images = cohort.task, cohort.images
    members = split.members(fold)
    ids = {"train": members["train"], "validation": members["validation"], "test": members["test"]}
    rows = {name: images[images["participant_id"].isin(ids[name])] for name in parts}
    scale = task.target_scale(rows["train"]["y"].to_numpy())
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
        "deadline": settings.deadline,
    }
    distributed.share_job(job)  # the other ranks of a distributed run fit the same job with this one
    result = fit(network, data["train"], data["validation"], fold_settings, task=task, run_dir=fold_dir,
                 device=device, scale=scale, resume=job["resume"], label=label,
                 tensorboard=settings.tensorboard, deadline=job["deadline"])  # fmt: skip
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
    settings = dataclasses.replace(settings, deadline=walltime.deadline(settings.time_limit))  # one for the job
    source = None
    if settings.init_from:  # checked before minutes of gathering
        source = transfer.load_source(settings.init_from, architecture=settings.architecture, inputs=settings.inputs,
                                      resolution_mm=settings.model_resolution)
    cohort = gather_cohort(manifest, output_dir=output_dir, cache_dir=cache_dir, qc=qc, settings=settings)
    split = split_and_check(cohort, output_dir=output_dir, settings=settings, source=source)
    selected = selected_folds(settings, split.n_folds)
    model_config = ModelConfig(
        architecture=settings.architecture,
        n_outputs=cohort.task.n_outputs(cohort.classes),
        in_shape=tuple(int(s) for s in np.load(cohort.images["array"].iloc[0], mmap_mode="r").shape[-3:]),  # type: ignore[arg-type]
        in_channels=len(settings.inputs),
    )
    searched = None
    if settings.search:  # the trials, then the best one's values are the study's
        searched = run_search(cohort, split, settings=settings, model_config=model_config, device=device)
        if searched is None:
            return None
        settings, model_config = with_values(settings, model_config, searched["best_values"])
    return _train_and_assemble(cohort, split, selected, settings=settings, model_config=model_config, device=device,
                               searched=searched, output_dir=output_dir, config_record=config_record,
                               environment=environment, manifest_sha256=manifest_sha256, started=started)


def _train_and_assemble(
    cohort: CohortStage, split: SplitStage, selected: list[int], *, settings: StudySettings, model_config: ModelConfig,
    device: torch.device, searched: dict[str, Any] | None, output_dir: Path, config_record: dict[str, Any],
    environment: dict[str, Any], manifest_sha256: str, started: float,
) -> dict[str, Any] | None:  # fmt: skip
    """The folds of ``selected`` trained (or reused), then, unless ``--fold`` chose some, the assembly."""
    if not settings.fold:
        _warn_of_folds_to_train(split, settings)
    prepare_run_dir(split.run_dir, settings, split, selected)
    if searched is not None:
        _reuse_best_trial(split, searched["best"], settings)
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
        searched=searched,
    )


def run_search(
    cohort: CohortStage, split: SplitStage, *, settings: StudySettings, model_config: ModelConfig,
    device: torch.device,
) -> dict[str, Any] | None:  # fmt: skip
    """``--search N``: each trial (those of ``--trial``, else all) trains every fold and is scored on the validation
    folds only; the record of every trial and the best (None when ``--trial`` ran some only: the refit is later)."""
    task, metric = cohort.task, settings.train.selection_metric
    wanted = list(settings.trial) or list(range(settings.search))
    trials = [_run_trial(k, cohort=cohort, split=split, settings=settings, model_config=model_config, device=device)
              for k in wanted]  # fmt: skip
    if settings.trial:
        LOGGER.info("Trained search trial(s) %s of %d in %s. When every trial has finished, run the group level again "
                    "without --trial (same options) to train the best and evaluate it.",
                    ", ".join(map(str, wanted)), settings.search, split.run_dir / "search")  # fmt: skip
        return None
    best = search.best_trial(trials, task.direction[metric])
    table = pd.DataFrame([{"trial": t["trial"], **t["values"], "score": t["score"],
                           **{f"fold_{i}": v for i, v in enumerate(t["fold_scores"])}} for t in trials])  # fmt: skip
    derivatives.write_text(split.run_dir / SEARCH_TRIALS, table.to_csv(sep="\t", index=False, float_format="%.6g"))
    LOGGER.info("Search: trial %d is best (validation %s %.4f over %d fold(s)): %s", best["trial"], metric,
                best["score"], split.n_folds, ", ".join(f"{k} {v:.3g}" for k, v in best["values"].items()))  # fmt: skip
    return {
        "n_trials": settings.search,
        "metric": metric,
        "larger_is_better": task.direction[metric],
        "space": [dataclasses.asdict(d) for d in search.SPACE],
        "searched": search.searched_names(settings.architecture),
        "scored_on": "the validation folds only (mean over folds of each fold's best validation score); the test "
        "set is predicted once, by the best trial's folds (the study's model)",
        "trials": trials,
        "best": best["trial"],
        "best_values": best["values"],
    }


#: Every search trial, tabulated beside results.json.
SEARCH_TRIALS = derivatives.STUDY_OUTPUTS["search_trials"]


def with_values(
    settings: StudySettings, model_config: ModelConfig, values: dict[str, float]
) -> tuple[StudySettings, ModelConfig]:
    """The study's settings and network with a trial's values (learning rate, weight decay, augmentation strength;
    width and dropout as the network's arguments)."""
    train = dataclasses.replace(settings.train, lr=values["lr"], weight_decay=values["weight_decay"],
                                augment=settings.train.augment or search.SEARCH_AUGMENT,
                                augment_strength=values["augment_strength"])  # fmt: skip
    kwargs = search.architecture_kwargs(settings.architecture, values["width"], values["dropout"])
    learning = {**settings.learning_settings, "search_values": values}
    return (dataclasses.replace(settings, train=train, learning_settings=learning),
            dataclasses.replace(model_config, kwargs={**model_config.kwargs, **kwargs}))  # fmt: skip


def _run_trial(
    trial: int, *, cohort: CohortStage, split: SplitStage, settings: StudySettings, model_config: ModelConfig,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """One search trial: every fold trained with its values (in ``search/trial-K/fold-F``) and scored on its
    validation participants; reused when it finished earlier with the same settings, values and participants."""
    values = search.draw_trial(settings.train.seed, trial)
    trial_settings, trial_config = with_values(settings, model_config, values)
    trial_split = dataclasses.replace(split, run_dir=split.run_dir / "search" / f"trial-{trial}")
    members = [split.members(k) for k in range(split.n_folds)]
    key = search.trial_key(settings.learning_settings, trial, values, members)
    record_path = trial_split.run_dir / derivatives.STUDY_OUTPUTS["trial_record"]
    if record_path.exists() and json.loads(record_path.read_text()).get("key") == key:
        LOGGER.info("Search trial %d finished earlier with these settings: reused (%s)", trial, record_path)
        return json.loads(record_path.read_text())["trial"]
    metric = settings.train.selection_metric
    LOGGER.info("Search trial %d (of trials 0-%d): %s", trial, settings.search - 1,
                ", ".join(f"{k} {v:.3g}" for k, v in values.items()))  # fmt: skip
    bests, epochs = [], []
    for fold in range(split.n_folds):
        _rows, data, network, scale, _ = _fold_setup(fold, cohort=cohort, split=trial_split, settings=trial_settings,
                                                     model_config=trial_config, parts=("train", "validation"))
        result = _fit_fold(fold, network, data, task=cohort.task, split=trial_split, settings=trial_settings,
                           model_config=trial_config, scale=scale, device=device)  # fmt: skip
        bests.append(result.best)
        epochs.append(len(result.history))
    record = {"trial": trial, "values": values, **search.trial_score(bests, metric), "metric": metric,
              "epochs": epochs}  # fmt: skip
    derivatives.write_json(record_path, {"key": key, "trial": record})
    return record


def _reuse_best_trial(split: SplitStage, best: int, settings: StudySettings) -> None:
    """The best trial's folds are the study's: trained with the same values, seeds and participants (each copied
    into the run folder, where :func:`_fit_fold` finds it finished)."""
    for fold in range(split.n_folds):
        source, target = split.run_dir / "search" / f"trial-{best}" / f"fold-{fold}", split.run_dir / f"fold-{fold}"
        if fold_finished(source, fold_key(settings, split, fold)) and not fold_finished(
            target, fold_key(settings, split, fold)
        ):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            LOGGER.info("Fold %d of search trial %d is the study's fold %d (same values, seeds and participants)",
                        fold, best, fold)  # fmt: skip


def serve_jobs(device: torch.device) -> int:
    """The other ranks of a distributed run: fit each job rank 0 shares, until it says there are no more.

    Returns the number of jobs fitted. A job ``{"stop": message}`` means rank 0 ended with an error.
    """
    fitted = 0
    while (job := distributed.share_job(None)) is not None:
        if "stop" in job:
            raise distributed.stopped_by_main(job)
        fit(job["network"], job["train"], None, job["settings"], task=job["task"], run_dir=job["run_dir"],
            device=device, scale=job["scale"], resume=job["resume"], label=job["label"],
            deadline=job["deadline"])  # fmt: skip
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
    cohort: CohortStage, split: SplitStage, folds: list[FoldResult], *, settings: StudySettings,
    model_config: ModelConfig, output_dir: Path, config_record: dict[str, Any], environment: dict[str, Any],
    manifest_sha256: str, device: torch.device, started: float, searched: dict[str, Any] | None = None,
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
                                    "test": test_eval}, manifest_sha256=manifest_sha256)  # fmt: skip
    record.update(postprocessing)
    record.update(_trust_record(split, folds, trust=trust, searched=searched, settings=settings))
    record["distribution"] = _distribution_record(cohort, split, folds, output_dir=output_dir)
    env = {**environment, "hardware": hardware_record(), "determinism": determinism_record(device, settings.train.amp),
           "distributed": distributed.current().record(), "seed": settings.train.seed}  # fmt: skip
    outer = settings.split.outer_test not in (None, EVERYONE)  # an outer fold's package stays in its folder
    package = _write_study_package(output_dir, run_dir, folds, record=record, config_record=config_record, env=env,
                                   outer=outer)  # fmt: skip
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
        "wall_time_s": round(time.monotonic() - started, 1),
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


def _study_identity(cohort: CohortStage, settings: StudySettings, package: Path, output_dir: Path) -> dict[str, Any]:
    """What ``results.json`` says first: the target, task, classes, network and the package written."""
    return {
        "target": settings.target,
        "task": cohort.task.name,
        "classes": cohort.classes,
        "positive_class": cohort.classes[-1] if len(cohort.classes) == 2 else None,
        "architecture": settings.architecture,
        "inputs": list(settings.inputs),
        "package": package.relative_to(output_dir).as_posix(),
        "content_sha256": json.loads((package / MODEL_JSON).read_text())["content_sha256"],
    }


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
    tables.append(_prediction_table(task, test_rows, ensemble, "test", "ensemble", cohort.classes, threshold))
    test_eval = _evaluate(task, test_rows, ensemble, threshold, seed=settings.train.seed, ci=True)
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


def _write_study_package(
    output_dir: Path, run_dir: Path, folds: list[FoldResult], *, record: dict[str, Any],
    config_record: dict[str, Any], env: dict[str, Any], outer: bool = False,
) -> Path:  # fmt: skip
    """The model package: ``model.json``, each fold's kept weights, and the evidence they came from; in
    ``models/``, or for an ``outer`` fold of a nested cross-validation in its own folder (the nested evaluation's
    evidence, and one member of the ensemble for later use)."""
    files: dict[str, Any] = {
        "config.json": config_record,
        "environment.json": env,
        "splits.tsv": run_dir.parent / "splits.tsv",
        "splits.json": run_dir.parent / "splits.json",
        "predictions.tsv": run_dir / derivatives.STUDY_OUTPUTS["predictions"],
    }
    if record.get("distribution"):
        files[ood.FILE] = run_dir / ood.FILE
    if (run_dir / CASE_SCORES).exists():
        files[CASE_SCORES] = run_dir / CASE_SCORES
    for fold in folds:
        history = derivatives.STUDY_OUTPUTS["history"]
        files[f"logs/history_fold-{fold.fold}.tsv"] = run_dir / f"fold-{fold.fold}" / history
    return write_package(
        run_dir / "models" if outer else output_dir / "models",
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


#: The evaluation of a study that has no test set (it learned from everyone: :data:`~.splits.EVERYONE`).
NO_TEST = {"n": 0, "n_subjects": 0, "metrics": {}, "note": "no test set: this model learned from every participant "
           "(its inner folds only); the nested cross-validation's outer folds estimate its performance"}  # fmt: skip


def _evaluate(task: Task, rows: pd.DataFrame, outputs: Any, threshold: float, *, seed: int, ci: bool) -> dict[str, Any]:
    if rows.empty:
        return dict(NO_TEST)
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
    dataset = derivatives.source_dataset(settings.bids_dir)
    seen = []
    for pid, group in images.groupby("participant_id", sort=True):
        roles = role.get(pid, set())
        if "test" in roles:
            continue
        seen.append(
            {
                "participant_id": pid,
                "dataset": dataset["key"],
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
        "dataset": dataset,  # whose participant IDs training_subjects are
        "training_subjects": seen,
        "test_subjects": sorted(set(splits.loc[splits["split"] == "test", "participant_id"])),
        "metrics": metrics if settings.expected is None else {**metrics, "test": settings.expected},
        "data": {
            "manifest_sha256": manifest_sha256,
            "splits_sha256": hashlib.sha256(splits.to_csv(sep="\t", index=False).encode()).hexdigest(),
            "n_images": len(images),
            "n_subjects": int(images["participant_id"].nunique()),
        },
        "learning_settings": settings.learning_settings,
        **task.package_fields(classes=classes, settings=settings),
        "model_card": _model_card(settings),
    }


def _model_card(settings: StudySettings) -> dict[str, Any]:
    """What the package says of its use and its limits."""
    everyone = "" if settings.expected is None else (" It learned from every participant (no test set); its test "
                                                     f"metrics are the {settings.expected['source']}.")  # fmt: skip
    return {
        "intended_use": f"Research: predicting {settings.target} from a T1w image preprocessed by bidsdl into "
        f"{TEMPLATE_SPACE} at {settings.model_resolution:g} mm.",
        "not_for_clinical_use": True,
        "limitations": "Trained on the subjects listed here; performance elsewhere is unknown until evaluated "
        f"externally (bidsdl group --model).{everyone}",
    }
