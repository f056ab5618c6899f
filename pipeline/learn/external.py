"""External evaluation at the group level (``group --model``): gather the participants' predictions and,
when the new dataset gives the target, evaluate the model on it exactly as training's test set was.

Nothing is trained. Predictions made by another model than the one given, predictions of subjects
the model saw in training (``--allow-training-subjects``), and images without a usable target are
listed and left out of the metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import derivatives
from ..errors import InputDataError
from .cohort import target_values
from .ensemble import check_ensemble, ensemble_id
from .package import read_package
from .tasks import get_task

LOGGER = logging.getLogger(__name__)
PREDICTIONS = derivatives.GROUP_OUTPUTS["predictions"]
EVALUATION = derivatives.GROUP_OUTPUTS["external_evaluation"]
#: Case-wise scores of an external segmentation evaluation (per image and structure, each T1w's grid).
CASE_SCORES = derivatives.GROUP_OUTPUTS["external_case_scores"]


def prediction_path(output_dir: Path, source: str) -> Path:
    """The participant level's prediction record of the BIDS image ``source``."""
    return derivatives.named_path(output_dir, source, "prediction")


def _failed_quality_control(output_dir: Path, source: str) -> bool:
    iqm = derivatives.named_path(output_dir, source, "iqm")
    try:
        return json.loads(iqm.read_text()).get("qc", {}).get("verdict") == "fail"
    except (OSError, ValueError):
        return False


def gather_predictions(
    manifest: pd.DataFrame, output_dir: Path, records: Sequence[dict[str, Any]]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """One row per image predicted by exactly these models; the others listed with the reason."""
    wanted = [r["content_sha256"] for r in records]
    classes = records[0]["classes"]
    task = get_task(records[0]["task"])
    rows, skipped = [], []
    for _, image in manifest.iterrows():
        path = prediction_path(output_dir, image["source"])
        if not path.exists():
            reason = "no prediction (run the participant level with --model)"
            if _failed_quality_control(output_dir, image["source"]):
                reason = "failed quality control (registration or brain extraction; see its report): not predicted"
            skipped.append({"source": image["source"], "reason": reason})
            continue
        record = json.loads(path.read_text())
        made_by = [m["content_sha256"] for m in record["models"]]
        if made_by != wanted:
            skipped.append(
                {
                    "source": image["source"],
                    "reason": f"predicted by another model ({', '.join(h[:8] for h in made_by)}); "
                    "re-run the participant level with these --model",
                }
            )
            continue
        row: dict[str, Any] = {
            "participant_id": image["participant_id"],
            "session_id": image.get("session_id"),
            "source": image["source"],
            "seen_in_training": record["seen_in_training"],
            **task.external_row(record, classes),
        }
        rows.append(row)
    return pd.DataFrame(rows), skipped


def _gathered(
    manifest: pd.DataFrame, output_dir: Path, records: Sequence[dict[str, Any]], model_dirs: Sequence[Path]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The gathered predictions and the images left out (logged); no prediction at all is an input error."""
    table, skipped = gather_predictions(manifest, output_dir, records)
    for item in skipped:
        LOGGER.warning("No prediction used for %s: %s.", item["source"], item["reason"])
    if table.empty:
        raise InputDataError(
            f"No image in {output_dir} has a prediction by {', '.join(str(m) for m in model_dirs)}. Run "
            "'bidsdl BIDS_DIR OUTPUT_DIR participant --model MODEL_DIR' first."
        )
    return table, skipped


def run_external_evaluation(
    manifest: pd.DataFrame,
    *,
    output_dir: Path,
    model_dirs: Sequence[Path],
    target: str | None,
    seed: int,
    bids_dir: Path | None = None,
    labels: Path | None = None,
    label_desc: str | None = None,
) -> dict[str, Any]:
    """Write ``predictions.tsv`` (+ ``.json``) and ``external_evaluation.json``; return the results."""
    records = [read_package(folder) for folder in model_dirs]
    check_ensemble(records, list(model_dirs))
    first = records[0]
    if get_task(first["task"]).voxelwise:
        return _external_segmentation(
            manifest, output_dir=output_dir, model_dirs=model_dirs, records=records, seed=seed, bids_dir=bids_dir,
            labels=labels, label_desc=label_desc,
        )  # fmt: skip
    task, classes = get_task(first["task"]), first["classes"]
    column = target or first["target"]
    table, skipped = _gathered(manifest, output_dir, records, model_dirs)
    evaluated, excluded = table, []
    try:
        values = target_values(manifest.set_index("source").loc[table["source"]].reset_index(), column)
    except InputDataError:
        if target is not None:
            raise
        values = None
        LOGGER.info("participants.tsv has no column %r: predictions gathered, nothing to evaluate.", column)
    if values is not None:
        table["target"] = values.to_numpy()
        keep = pd.Series(True, index=table.index)
        for index, row in table.iterrows():
            reason = None
            if row["seen_in_training"]:
                reason = "seen in training (--allow-training-subjects): not an external test"
            elif pd.isna(row["target"]):
                reason = f"no value for {column}"
            else:
                reason = task.external_reason(row["target"], column, classes)
            if reason:
                keep[index] = False
                excluded.append({"source": row["source"], "reason": reason})
        evaluated = table[keep]
    evaluation = None
    if values is not None and not evaluated.empty:
        evaluation = task.external_evaluate(evaluated, classes, seed=seed)
    derivatives.write_text(output_dir / PREDICTIONS, table.to_csv(sep="\t", index=False, na_rep="n/a"))
    models = _model_entries(model_dirs, records)
    derivatives.write_json(
        output_dir / PREDICTIONS.replace(".tsv", ".json"),
        {
            "Description": "The participant level's predictions of every image, gathered by the group level",
            "Models": models,
            "EnsembleID": ensemble_id(records),
            "seen_in_training": "true when the model saw this participant (or this image) in training or validation",
            "predicted": "the label at the model's threshold, or the predicted value",
            "probability": "probability of the positive class" if len(classes or []) == 2 else None,
        },
    )
    results = {
        "models": models,
        "ensemble_id": ensemble_id(records),
        "task": task.name,
        "target": column,
        "classes": classes,
        "positive_class": first.get("positive_class"),
        "training": {
            "n_subjects": first["data"]["n_subjects"],
            "test": first["metrics"]["test"],
        },
        "n_predicted": len(table),
        "n_evaluated": len(evaluated) if evaluation else 0,
        "skipped": skipped,
        "excluded": excluded,
        "evaluation": evaluation,
        "truth": evaluated["target"].tolist() if evaluation and not task.discrete else None,
        "predicted": evaluated["predicted"].tolist() if evaluation and not task.discrete else None,
        "seen_in_training": table.loc[table["seen_in_training"].astype(bool), "source"].tolist(),
    }
    derivatives.write_json(output_dir / EVALUATION, results)
    if evaluation:
        headline = task.headline_metric(len(classes or []))
        LOGGER.info(
            "External evaluation on %d image(s): %s %.3f", len(evaluated), headline, evaluation["metrics"][headline]
        )
    return results


def _external_segmentation(
    manifest: pd.DataFrame,
    *,
    output_dir: Path,
    model_dirs: Sequence[Path],
    records: Sequence[dict[str, Any]],
    seed: int,
    bids_dir: Path | None,
    labels: Path | None,
    label_desc: str | None,
) -> dict[str, Any]:
    """Compare the participant level's labels (each T1w's own grid) with reference labels, case by case."""
    import nibabel as nib

    from .labels import check_labels_dataset, find_label, find_table, load_label
    from .tasks.segmentation import structure_scores, summarise_cases

    first = records[0]
    desc = first["label_desc"]
    table, skipped = _gathered(manifest, output_dir, records, model_dirs)
    names = {int(e["index"]): e["name"] for e in first["labels"]}
    cases, excluded = [], []
    if labels is not None and label_desc is not None and bids_dir is not None:
        check_labels_dataset(labels)
        reference_table = find_table(labels, label_desc)
        if set(reference_table.names.values()) != set(names.values()):
            LOGGER.warning(
                "The reference labels name %s; the model predicts %s: only the structures of both are compared.",
                ", ".join(reference_table.structures), ", ".join(names.values()),
            )  # fmt: skip
        for _, row in table.iterrows():
            source = row["source"]
            reference_path = find_label(labels, source, label_desc)
            reason = None
            if row["seen_in_training"]:
                reason = "seen in training (--allow-training-subjects): not an external test"
            elif reference_path is None:
                reason = f"no reference labels (desc-{label_desc}) in {labels}"
            if reason:
                excluded.append({"source": source, "reason": reason})
                continue
            assert reference_path is not None
            try:
                reference = load_label(reference_path, Path(bids_dir) / source, reference_table)
            except InputDataError as exc:
                excluded.append({"source": source, "reason": str(exc)})
                LOGGER.error("%s", exc)
                continue
            predicted_img = nib.load(derivatives.named_path(output_dir, source, "dseg", label_desc=desc))
            predicted = np.asarray(predicted_img.dataobj).astype(np.uint8)  # type: ignore[attr-defined]
            # compare structure by structure name: the reference's indices may differ from the model's
            by_name = {n: i for i, n in reference_table.names.items()}
            remapped = np.zeros_like(reference)
            for index, name in names.items():
                if name in by_name:
                    remapped[reference == by_name[name]] = index
            spacing = [float(z) for z in predicted_img.header.get_zooms()[:3]]  # type: ignore[attr-defined]
            common = {i: n for i, n in names.items() if n in by_name}
            for score in structure_scores(predicted, remapped, common, spacing):
                cases.append({"participant_id": row["participant_id"], "source": source, **score})
    evaluation = None
    if cases:
        evaluation = summarise_cases(pd.DataFrame(cases), seed=seed, ci=True)
        derivatives.write_text(
            output_dir / CASE_SCORES,
            pd.DataFrame(cases).to_csv(sep="\t", index=False, float_format="%.4f", na_rep="n/a"),
        )
        evaluation["cases"] = cases
        LOGGER.info(
            "External evaluation on %d image(s): mean Dice %.3f", evaluation["n"], evaluation["metrics"]["dice"]
        )
    volumes = pd.DataFrame(
        [{"participant_id": r["participant_id"], "source": r["source"], **json.loads(
            derivatives.named_path(output_dir, r["source"], "prediction").read_text())["volumes_ml"]}
         for _, r in table.iterrows()]
    )  # fmt: skip
    derivatives.write_text(output_dir / PREDICTIONS, volumes.to_csv(sep="\t", index=False, na_rep="n/a"))
    models = _model_entries(model_dirs, records)
    derivatives.write_json(
        output_dir / PREDICTIONS.replace(".tsv", ".json"),
        {
            "Description": "Volumes (ml) of the structures the models segmented in each image, gathered by the "
            "group level",
            "Models": models,
            "EnsembleID": ensemble_id(records),
        },
    )
    worst = []
    if cases:
        per_case = pd.DataFrame(cases).groupby("source", sort=False)["dice"].mean().sort_values().head(5)
        worst = [{"source": source, "dice": float(dice)} for source, dice in per_case.items()]
    results = {
        "worst": worst,
        "models": models,
        "ensemble_id": ensemble_id(records),
        "task": first["task"],
        "target": desc,
        "classes": first["classes"],
        "positive_class": None,
        "training": {"n_subjects": first["data"]["n_subjects"], "test": first["metrics"]["test"]},
        "n_predicted": len(table),
        "n_evaluated": evaluation["n"] if evaluation else 0,
        "skipped": skipped,
        "excluded": excluded,
        "evaluation": evaluation,
        "truth": None,
        "predicted": None,
        "seen_in_training": table.loc[table["seen_in_training"].astype(bool), "source"].tolist(),
    }
    derivatives.write_json(output_dir / EVALUATION, {**results, "evaluation": _without_cases(evaluation)})
    return results


def _without_cases(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if evaluation is None else {k: v for k, v in evaluation.items() if k != "cases"}


def _model_entries(model_dirs: Sequence[Path], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"package": str(folder), "name": r["name"], "content_sha256": r["content_sha256"],
         "bidsdl_version": r["bidsdl_version"]}
        for folder, r in zip(model_dirs, records, strict=True)
    ]  # fmt: skip
