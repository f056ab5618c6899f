"""What a study leaves behind: the model package (``model.json`` assembled once, with its model card), the case
scores, the split counts and the worst cases the report lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ... import derivatives
from ...kinds import REFERENCE_KIND
from ...ops.template import TEMPLATE_SPACE, resolution_label
from .. import ood
from ..models import ModelConfig
from ..package import MODEL_JSON, write_package
from ..task import Task
from .settings import CohortStage, FoldResult, StudySettings

RESULTS = derivatives.STUDY_OUTPUTS["results"]


#: Case-wise scores of voxel-wise tasks (per image and structure, every fold and split, both spaces).
CASE_SCORES = derivatives.STUDY_OUTPUTS["case_scores"]


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
